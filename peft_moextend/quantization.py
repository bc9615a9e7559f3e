"""Handling of quantized (bitsandbytes) base layers shared by every method of this package."""

from __future__ import annotations

import math

import torch
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


def _bnb_4bit_parametrization(module: nn.Module, name: str):
    """bitsandbytes' 4-bit parametrization of `module.<name>` (see `expert_quantization`), else None."""
    parametrizations = getattr(module, "parametrizations", None)
    if parametrizations is None or name not in parametrizations:
        return None
    return next((p for p in parametrizations[name] if hasattr(p, "quant_state")), None)


def parameter_meta(module: nn.Module, name: str) -> tuple[torch.Size, torch.dtype, torch.device]:
    """Shape, dtype and device of `module.<name>` as the module computes with it, without dequantizing a 4-bit
    parameter (reading it would dequantize the whole tensor)."""
    parametrization = _bnb_4bit_parametrization(module, name)
    if parametrization is None:
        tensor = getattr(module, name)
        return tensor.shape, tensor.dtype, tensor.device
    state = parametrization.quant_state
    return state.shape, state.dtype, module.parametrizations[name].original.device


def parameter_slice(module: nn.Module, name: str, index: int) -> torch.Tensor:
    """`module.<name>[index]`; for a 4-bit parameter only that slice is dequantized (a new tensor, so autograd never
    keeps the whole dequantized parameter alive)."""
    parametrization = _bnb_4bit_parametrization(module, name)
    if parametrization is None:
        return getattr(module, name)[index]
    import bitsandbytes.functional as bnb_functional

    state = parametrization.quant_state
    per_slice = math.prod(state.shape[1:])
    if per_slice % state.blocksize or per_slice % 2:  # the slice does not start on a block: dequantize all
        return getattr(module, name)[index].clone()
    absmax = state.absmax
    if state.nested:
        absmax = bnb_functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    start = index * per_slice
    sliced = bnb_functional.QuantState(
        absmax=absmax[start // state.blocksize : (start + per_slice) // state.blocksize],
        shape=torch.Size(state.shape[1:]),
        code=state.code,
        blocksize=state.blocksize,
        quant_type=state.quant_type,
        dtype=state.dtype,
    )
    packed = module.parametrizations[name].original.view(-1)[start // 2 : (start + per_slice) // 2]
    return bnb_functional.dequantize_4bit(packed.view(-1, 1), sliced)


def resident_bytes(model: nn.Module) -> int:
    """Bytes the model's weights occupy: parameters and buffers (4-bit ones as stored) plus the quantization
    statistics of bitsandbytes 4-bit weights (absmax, code, nested statistics)."""
    total = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    states = [getattr(p, "quant_state", None) for p in model.parameters()]
    for module in model.modules():
        for name in getattr(module, "parametrizations", {}):
            parametrization = _bnb_4bit_parametrization(module, name)
            states.append(None if parametrization is None else parametrization.quant_state)
    for state in states:
        if state is None or not hasattr(state, "absmax"):
            continue
        tensors = [state.absmax, state.code]
        if state.nested:
            tensors += [state.state2.absmax, state.state2.code]
        total += sum(t.numel() * t.element_size() for t in tensors)
    return total
