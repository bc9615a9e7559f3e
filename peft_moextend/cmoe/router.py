"""Routing inside one CMoE task: the task's router mixes its experts densely (default) or per token top-k.

Einstein notation: t - tokens, i - in features, e - experts of the task's router, k - experts chosen per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..routing import dispatch_mask_from_top_k

# std of a top-k router's initial rows: the initializer range of Mixtral/Llama configs, as SMoLA's router
TOP_K_ROUTER_INIT_STD = 0.02


def initial_router(num_experts: int, in_features: int, top_k: int | None) -> torch.Tensor:
    """A new task's router `(e, i)`.

    Dense routing starts at zero: every expert gets the same weight, and a PGKE probe starts exactly at its uniform
    share. Top-k routing starts small and random: with all logits tied, every token would choose the same k experts
    (by index) and the others would never be chosen, so they would never get a gradient.
    """
    if top_k is None:
        return torch.zeros(num_experts, in_features)
    return torch.randn(num_experts, in_features) * TOP_K_ROUTER_INIT_STD


def task_gates(logits: torch.Tensor, top_k: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gates `(t, e)` from one task router's logits `(t, e)`, and the `(t, e)` bool mask of the experts each token
    is dispatched to (None for dense routing, where every token uses every expert).

    top_k None: softmax over all e experts. Else softmax over each token's `min(top_k, e)` largest logits, the other
    experts get exactly 0 (= softmax, keep the top k, renormalise; a router over fewer than `top_k` experts, as a
    PGKE probe's in a layer without experts, mixes all of them).
    """
    if top_k is None:
        return F.softmax(logits, dim=-1), None
    num_experts = logits.shape[-1]
    top_k_index = torch.topk(logits, min(top_k, num_experts), dim=-1).indices  # (t, k)
    chosen = dispatch_mask_from_top_k(top_k_index, num_experts)  # (t, e)
    return F.softmax(logits.masked_fill(~chosen, float("-inf")), dim=-1), chosen
