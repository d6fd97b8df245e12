"""Value types and tensor math that everything else builds on: directions, edits, linear
algebra and divergences. Imports torch only (no transformers, nothing above it)."""

# Importing the edit kinds registers them with ``edit_from_dict``/``load_edit``.
from abliterate.core import ablation as ablation
from abliterate.core import delta as delta
from abliterate.core import steering as steering
