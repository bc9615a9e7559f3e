"""MoExtend -> a plain transformers MoE: the new experts appended to the fused expert tensors and their router rows
to the router, in place, so that `merge_and_unload()` returns the same model class with `n` more experts per MoE
layer, which transformers (and any serving engine that serves the family) loads without this package.

Exact where the plain architecture can express the routing: every MoE block extended by the same number of experts,
no calibration module, no `restrict_to_modalities`, full-precision expert tensors. Anything else is refused with an
error that names the option.

Einstein notation: h - hidden, i - expert intermediate size, e - old experts, n - new experts, r - rank.
"""

from __future__ import annotations

import torch
from torch import nn

from ..moe_families import MoEBlock
from ..quantization import _bnb_4bit_parametrization
from .config import MoExtendConfig
from .layer import MoExtendLayer

EXPERT_COUNT_FIELDS = ("num_local_experts", "num_experts")
"""Config / module attributes that hold a block's expert count (Mixtral and Llama 4 / Qwen-MoE, OLMoE)."""


def check_exportable(blocks: list[MoEBlock], adapter_name: str, config: MoExtendConfig) -> int:
    """Raise a clear error unless adapter `adapter_name` can become a plain MoE exactly; returns `n`, the experts
    it adds to every MoE block. `blocks`: every MoE block of the model (`moe_families.moe_blocks`)."""
    refusal = "merge_and_unload() cannot export MoExtend adapter {name!r} to a plain transformers MoE: {why}"
    if config.calibration:
        raise ValueError(
            refusal.format(
                name=adapter_name,
                why="its routing calibration module (`calibration=True`) has no "
                "counterpart in the plain router. Train with `MoExtendConfig(calibration=False)` to export.",
            )
        )
    restricted = next((m for m in config.stage_modalities() if m is not None), None)
    if restricted is not None:
        raise ValueError(
            refusal.format(
                name=adapter_name,
                why=f"`restrict_to_modalities={restricted}` keeps "
                "other tokens off the new experts, which a plain router cannot express. Train without "
                "`restrict_to_modalities` to export, or keep serving the PeftModel.",
            )
        )
    counts = {}
    for moe_block in blocks:
        name, layer = moe_block.name, moe_block.module
        counts[name] = (
            sum(layer.stage_sizes(adapter_name))
            if isinstance(layer, MoExtendLayer) and layer.extends(adapter_name)
            else 0
        )
        experts = moe_block.block.experts
        if any(_bnb_4bit_parametrization(experts, t) is not None for t in ("gate_up_proj", "down_proj")):
            raise ValueError(
                refusal.format(
                    name=adapter_name,
                    why=f"the experts of {name!r} are stored in 4 bits. Export onto a "
                    "full-precision base: load the base without `quantization_config` (e.g. in bfloat16), then "
                    "`PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()`.",
                )
            )
    if len(set(counts.values())) != 1:
        raise ValueError(
            refusal.format(
                name=adapter_name,
                why="a plain MoE config has one expert count for every MoE layer, "
                f"but this adapter adds {sorted(set(counts.values()))} experts to different layers "
                f"({counts}). Extend every MoE layer (`target_layers=None`) to export.",
            )
        )
    return next(iter(counts.values()))


def new_expert_tensors(layer: MoExtendLayer, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The adapter's new experts, every stage in order, as full tensors in the base layout: gate/up `(n, 2i, h)` and
    down `(n, h, i)` (`(n, h, 2i)` / `(n, i, h)` for transposed layouts); low-rank ones materialised as
    source + `B @ A`."""
    gate_up, down = [], []
    for k in range(layer.num_stages(adapter_name)):
        experts = layer.added_experts(adapter_name, k)
        if not layer.is_low_rank(adapter_name):
            gate_up.append(experts.gate_up_proj)
            down.append(experts.down_proj)
            continue
        for tensors, source, a, b in (
            (gate_up, experts.source_gate_up, experts.gate_up_a, experts.gate_up_b),
            (down, experts.source_down, experts.down_a, experts.down_b),
        ):
            delta = torch.bmm(b, a)  # (n, out, in)
            if experts.is_transposed:
                delta = delta.transpose(1, 2)
            tensors.append(source.to(delta.dtype).unsqueeze(0) + delta)
    return torch.cat(gate_up), torch.cat(down)


@torch.no_grad()
def append_new_experts(layer: MoExtendLayer, adapter_name: str) -> None:
    """Append the adapter's new experts and router rows (every stage, in order) to `layer.base_layer` in place (base
    dtype)."""
    block, family = layer.base_layer, layer.family
    experts, router = block.experts, family.router(block)
    old = layer.num_base_experts
    gate_up, down = new_expert_tensors(layer, adapter_name)
    for name, new in (("gate_up_proj", gate_up), ("down_proj", down)):
        weight = getattr(experts, name)
        setattr(experts, name, nn.Parameter(torch.cat([weight, new.to(weight)]), requires_grad=False))
    new_rows = torch.cat(layer.stages("router", layer.num_stages(adapter_name), adapter_name))
    router.weight = nn.Parameter(torch.cat([router.weight, new_rows.to(router.weight)]), requires_grad=False)
    if getattr(router, "bias", None) is not None:  # new rows have no bias in MoExtend's routing
        router.bias = nn.Parameter(torch.cat([router.bias, router.bias.new_zeros(new_rows.shape[0])]), False)
    new_count = old + new_rows.shape[0]
    for module in (block, router, experts):
        for field in (*EXPERT_COUNT_FIELDS, "out_features"):
            if getattr(module, field, None) == old:
                setattr(module, field, new_count)


def update_config(model: nn.Module, old: int, new: int) -> None:
    """Set the expert count of the model's (text) config from `old` to `new`."""
    configs = [model.config, model.config.get_text_config(decoder=True)]
    updated = False
    for config in configs:
        for field in EXPERT_COUNT_FIELDS:
            if getattr(config, field, None) == old:
                setattr(config, field, new)
                updated = True
    if not updated:
        raise ValueError(
            f"Cannot find the expert count ({old}) in the config of {type(model).__name__} (fields "
            f"{EXPERT_COUNT_FIELDS}); this family cannot be exported yet."
        )
