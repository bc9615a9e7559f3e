"""Default target modules: the linear layers of a transformers model's language model."""

from __future__ import annotations

import re

from torch import nn

LANGUAGE_MODEL_LINEARS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""Attention and MLP projections of Llama-style decoders (Llama, Mistral, Qwen2/3, Gemma, SmolLM, ...)."""


def language_model_name(model: nn.Module) -> str:
    """Qualified name of the model's language model (decoder) module; "" when the model is the decoder itself."""
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    if decoder is None:
        return ""
    return next((name for name, module in model.named_modules() if module is decoder), "")


def default_language_model_targets(model: nn.Module, linears: tuple[str, ...] = LANGUAGE_MODEL_LINEARS) -> str:
    """Regex for PEFT's `target_modules`: the `linears` (by name) inside the language model (never a tower)."""
    prefix = language_model_name(model)
    names = "|".join(linears)
    scope = rf"{re.escape(prefix)}\..*" if prefix else r".*"
    return rf"^{scope}\.({names})$"
