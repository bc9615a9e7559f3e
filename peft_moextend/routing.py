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

    router_probs: `(t, e)` routing probabilities over all experts the layer routes to.
    dispatch_mask: `(t, e)` bool, the experts each token was sent to.
    token_mask: `(t,)` bool, tokens that count for the load-balancing loss (non-padding, eligible), or None = all.
    """

    router_probs: torch.Tensor
    dispatch_mask: torch.Tensor
    token_mask: torch.Tensor | None = None


def dispatch_mask_from_top_k(top_k_index: torch.Tensor, num_experts: int) -> torch.Tensor:
    """`(t, e)` bool mask of the experts chosen in `(t, k)` top-k indices."""
    return F.one_hot(top_k_index, num_experts).sum(dim=1) > 0


def load_balancing_loss(record: RoutingRecord) -> torch.Tensor:
    """Switch-Transformer load-balancing loss of one layer: `e * sum_e f_e * P_e`.

    f_e is the share of counted tokens dispatched to expert e (summed over top-k slots) and P_e the mean router
    probability of e (Fedus et al. 2021, eq. 4; normalised as transformers' Mixtral `load_balancing_loss_func`, so
    a perfectly balanced top-k router scores k). Returns a scalar; zero when no token counts.
    """
    probs, dispatch, mask = record.router_probs, record.dispatch_mask, record.token_mask
    if mask is not None:
        probs, dispatch = probs[mask], dispatch[mask]
    if probs.shape[0] == 0:
        return probs.sum() * 0.0
    num_experts = probs.shape[-1]
    return num_experts * (dispatch.float().mean(dim=0) * probs.float().mean(dim=0)).sum()


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
