"""Routing losses and statistics shared by every routed method of this package.

Einstein notation used below: t - tokens, e - experts, k - top-k slots.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class RoutingRecord:
    """What one routed layer saw in the last forward call.

    router_logits: `(t, e)` logits over all experts the layer routes to (old + new).
    top_k_index: `(t, k)` chosen experts.
    token_mask: `(t,)` bool, tokens that count for the load-balancing loss (non-padding, eligible), or None = all.
    """

    router_logits: torch.Tensor
    top_k_index: torch.Tensor
    token_mask: torch.Tensor | None


def load_balancing_loss(record: RoutingRecord) -> torch.Tensor:
    """Switch-Transformer load-balancing loss of one layer: `e * sum_e f_e * P_e`.

    f_e is the fraction of routing slots assigned to expert e and P_e the mean router probability of e over the
    counted tokens (Fedus et al. 2021, eq. 4; normalised as transformers' Mixtral `load_balancing_loss_func`, so a
    perfectly balanced router scores `top_k`). Returns a scalar; zero when no token counts.
    """
    logits, index, mask = record.router_logits, record.top_k_index, record.token_mask
    if mask is not None:
        logits, index = logits[mask], index[mask]
    num_experts = logits.shape[-1]
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    probs = F.softmax(logits.float(), dim=-1)  # (t, e)
    slot_fraction = F.one_hot(index, num_experts).float().mean(dim=0)  # (k, e)
    return num_experts * (slot_fraction * probs.mean(dim=0)).sum()


def expert_usage(top_k_index: torch.Tensor, num_experts: int, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Counts of routing slots per expert, `(e,)` float, from `(t, k)` chosen experts."""
    if token_mask is not None:
        top_k_index = top_k_index[token_mask]
    return torch.bincount(top_k_index.reshape(-1), minlength=num_experts).float()


def router_aux_loss(layers: Iterable[nn.Module]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Load-balancing loss over the routed layers that recorded routing in the last call.

    Each layer exposes `routing_record` (a `RoutingRecord` or None) and `router_aux_loss_coef` (float, of its
    active adapter). Returns `(mean of coef * loss, mean of loss)` over layers, or None when no layer routed.
    """
    records = [(layer.routing_record, layer.router_aux_loss_coef) for layer in layers if layer.routing_record]
    if not records:
        return None
    losses = torch.stack([load_balancing_loss(record) for record, _ in records])
    coefs = torch.tensor([coef for _, coef in records], dtype=losses.dtype, device=losses.device)
    return (losses * coefs).mean(), losses.mean()
