"""Handling of quantized (bitsandbytes) base layers shared by every method of this package."""

from __future__ import annotations

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
