"""abliterate: edit the alignment behaviour of open-weight chat models without retraining.

The public API mirrors the CLI: every command is a function taking the same typed config.
Heavy libraries (torch, transformers) are imported by the modules that need them, so importing
this package and running ``abliterate --help`` stay fast.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
