"""Measurements that find directions: residual activations and the candidate directions
computed from their means."""
