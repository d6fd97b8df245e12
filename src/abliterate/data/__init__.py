"""Prompt sets (built-in, files, hub) and their chat formatting and batching."""
