"""Applying edits: reversible hooks on a live model, permanent changes through a weight
store, and export of the edited model."""
