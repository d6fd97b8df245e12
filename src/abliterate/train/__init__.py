"""Changing a model by data: filtering instruction datasets (``filter-dataset``), supervised
fine-tuning (``sft``) and preference optimisation that heals an abliterated model (``heal``),
with TRL and PEFT."""
