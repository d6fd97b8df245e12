"""Models as the tool sees them: loading (hub, directory, GGUF, demo; device maps), the
per-family anatomy of residual writers with their tensor names, weight stores, and batched
forward passes and generation."""
