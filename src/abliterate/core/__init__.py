"""Value types and tensor math that everything else builds on: directions, edits, linear
algebra and divergences. Imports torch only (no transformers, nothing above it)."""
