"""Measuring a model: refusal judges, generations, KL divergences, quality metrics,
benchmarks, and the one evaluator that fills the typed report."""
