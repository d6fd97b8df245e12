"""Choosing an edit: automatic selection among candidate directions and the multi-objective
search over the edit space (its space, objective, study and Pareto front)."""
