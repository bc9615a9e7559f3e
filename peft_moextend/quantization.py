"""Handling of quantized (bitsandbytes) base layers shared by every method of this package."""

from __future__ import annotations

from peft.utils.quantization_utils import resolve_quantization_backend
from torch import nn


def protect_cpu_4bit_layers(model: nn.Module) -> int:
    """Keep bitsandbytes 4-bit layers trainable on CPU; returns how many layers were protected.

    On CPUs with AVX512-BF16, the first eval / no-grad forward of a `bnb.nn.Linear4bit` permanently repacks its
    weight into an inference-only layout, after which gradients through it silently stop (bitsandbytes 0.50).
    Turning off `support_avx512bf16_for_cpu` before any such forward keeps the trainable layout.
    """
    protected = 0
    for module in model.modules():
        if type(module).__name__ == "Linear4bit" and hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
            protected += 1
    return protected


def linear_features(base_layer: nn.Module, module_name: str, method: str) -> tuple[int, int]:
    """`(in_features, out_features)` of a linear base layer: `nn.Linear` or a quantized linear PEFT knows
    (bitsandbytes `Linear4bit` / `Linear8bitLt`, HQQ, torchao, ...). Anything else gets a clear error."""
    if isinstance(base_layer, nn.Linear) or resolve_quantization_backend(base_layer) is not None:
        return base_layer.in_features, base_layer.out_features
    raise ValueError(
        f"{method} adapts linear layers, but target {module_name!r} is a {type(base_layer).__name__}. Choose "
        "`target_modules` that name nn.Linear (or bitsandbytes 4-bit/8-bit linear) modules."
    )
