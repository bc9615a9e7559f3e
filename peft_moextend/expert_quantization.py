"""4-bit storage of the fused expert tensors of MoE models (bitsandbytes' parametrization).

`from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_4bit=True))` quantizes a transformers MoE
model's `nn.Linear` layers only: the fused 3-D expert tensors (`experts.gate_up_proj`, `experts.down_proj`) — most
of the model's weights — stay in full precision. bitsandbytes ships `nn.parametrize.replace_parameter_4bit` for
exactly this case: the tensor is stored quantized and dequantized when the experts module reads it (cached for one
forward of the module). Every tuner of this package calls `quantize_experts_like_the_base` at injection, so a 4-bit
base gets 4-bit experts on the user's normal path; `quantize_moe_experts` does it for models quantized otherwise.

The experts compute in the dtype the tensors had (the model's dtype), as the model's other layers do.
"""

from __future__ import annotations

import logging
import warnings

from torch import nn

from .moe_families import moe_blocks
from .quantization import _bnb_4bit_parametrization

logger = logging.getLogger("peft_moextend")

FUSED_EXPERT_TENSORS = ("gate_up_proj", "down_proj")


def _expert_tensors(model: nn.Module) -> tuple[list[tuple[str, nn.Module, str]], list[str]]:
    """`(block name, experts module, tensor name)` of every fused expert tensor of a supported MoE block, and a
    description of the MoE blocks whose experts cannot be stored in 4 bits."""
    tensors, unsupported = [], []
    for found in moe_blocks(model):
        if found.family is None:
            unsupported.append(f"{type(found.block).__name__} at {found.name!r}")
            continue
        for tensor in FUSED_EXPERT_TENSORS:
            tensors.append((found.name, found.block.experts, tensor))
    return tensors, unsupported


def quantize_moe_experts(
    model: nn.Module, quant_type: str = "nf4", compress_statistics: bool = False, blocksize: int | None = None
) -> int:
    """Store every fused expert tensor of `model`'s supported MoE blocks in 4 bits (bitsandbytes, `quant_type`
    "nf4" or "fp4", `compress_statistics` = double quantization). Tensors already stored in 4 bits are left as they
    are. Returns how many tensors were quantized.

    The quantization changes the base model in place (as loading it in 4 bits would have, had transformers covered
    the experts); `unload()` gives back the model with 4-bit experts.
    """
    from bitsandbytes.nn.parametrize import replace_parameter_4bit

    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"`quant_type` must be 'nf4' or 'fp4', got {quant_type!r}.")
    tensors, _ = _expert_tensors(model)
    quantized = 0
    for _, experts, tensor in tensors:
        if _bnb_4bit_parametrization(experts, tensor) is None:
            replace_parameter_4bit(
                experts, tensor, compress_statistics=compress_statistics, quant_type=quant_type, blocksize=blocksize
            )
            quantized += 1
    return quantized


def _quantization_config(model: nn.Module):
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if isinstance(config, dict):
        from transformers import BitsAndBytesConfig

        config = BitsAndBytesConfig.from_dict(config)
    return config


def quantize_experts_like_the_base(model: nn.Module) -> None:
    """At injection: a base loaded with a 4-bit `BitsAndBytesConfig` gets its fused expert tensors stored in 4 bits
    with the config's quant type and double quantization (one log line); an 8-bit base gets one warning that its
    experts stay in full precision (bitsandbytes has no 8-bit storage for them)."""
    config = _quantization_config(model)
    if config is None or not (getattr(config, "load_in_4bit", False) or getattr(config, "load_in_8bit", False)):
        return
    tensors, unsupported = _expert_tensors(model)
    if unsupported:
        warnings.warn(
            f"The base model is quantized with bitsandbytes, but the experts of {unsupported} cannot be stored in 4 "
            f"bits by peft-moextend (fused tensors {list(FUSED_EXPERT_TENSORS)} of a supported MoE family are needed): "
            "they stay as loaded.",
            stacklevel=3,
        )
    if not tensors:
        return
    if getattr(config, "load_in_8bit", False):
        warnings.warn(
            "The base model is loaded in 8 bits, but bitsandbytes quantizes only its nn.Linear layers: the fused "
            f"expert tensors of its {len(tensors) // 2} MoE layers (most of an MoE model's weights) stay in full "
            "precision, and bitsandbytes has no 8-bit storage for them. Load the base with "
            "`BitsAndBytesConfig(load_in_4bit=True)` to store the experts in 4 bits too.",
            stacklevel=3,
        )
        return
    quantized = quantize_moe_experts(
        model, quant_type=config.bnb_4bit_quant_type, compress_statistics=config.bnb_4bit_use_double_quant
    )
    if quantized:
        logger.warning(
            "peft-moextend: stored %d fused expert tensors of %d MoE layers in 4 bits (%s%s), as the base model's "
            "other layers: bitsandbytes' from_pretrained leaves them in full precision.",
            quantized,
            len({name for name, _, _ in tensors}),
            config.bnb_4bit_quant_type,
            ", double quantization" if config.bnb_4bit_use_double_quant else "",
        )
