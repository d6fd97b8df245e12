"""Small shared vocabulary types (no torch, no transformers): residual sites and dtype names."""

from __future__ import annotations

from typing import Literal

Site = Literal["pre", "mid", "post"]
"""A residual-stream site of a decoder layer: block input, between mixer and MLP, block output."""

SITES: tuple[Site, ...] = ("pre", "mid", "post")

DType = Literal["auto", "float32", "bfloat16", "float16"]
SearchDType = Literal["auto", "model", "float32", "bfloat16", "float16"]
RefusalObjective = Literal["next_token", "openings"]

Thinking = Literal["off", "on"]
"""Whether a reasoning model reasons before answering (the chat template's thinking switch)."""

LoadIn = Literal["4bit", "8bit"]
"""bitsandbytes quantization of the model the edit is measured and searched on."""
RowFormatOption = Literal["auto", "alpaca", "sharegpt", "messages"]
"""The row format of an instruction dataset, or ``auto`` to detect it."""
AdapterKind = Literal["lora", "qlora", "full"]
"""How a model is fine-tuned: LoRA adapters, LoRA on a 4-bit model, or every weight."""
PreferenceLoss = Literal["dpo", "dpo+sft", "distill"]
"""The preference loss of ``heal``."""
