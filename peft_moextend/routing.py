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
    aux_loss_coef: weight of this record's load-balancing loss in the training loss (its adapter's setting).
    """

    router_probs: torch.Tensor
    dispatch_mask: torch.Tensor
    token_mask: torch.Tensor | None = None
    aux_loss_coef: float = 0.0


class RoutedLayer:
    """Mixin of tuner layers that route tokens to experts: `routing_records` holds, per adapter that routed tokens
    in the current call, its `RoutingRecord` (cleared at the start of every model call; read by
    `add_router_aux_loss`)."""

    routing_records: dict[str, RoutingRecord]


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
    """Load-balancing loss over the routing records of the last call.

    Each routed layer keeps `routing_records`, one `RoutingRecord` per adapter that routed tokens in the call.
    Returns `(mean of coef * loss, mean of loss)` over records, or None when nothing routed.
    """
    records = [record for layer in layers for record in layer.routing_records.values()]
    if not records:
        return None
    losses = torch.stack([load_balancing_loss(record) for record in records])
    coefs = torch.tensor([record.aux_loss_coef for record in records], dtype=losses.dtype, device=losses.device)
    return (losses * coefs).mean(), losses.mean()


def add_router_aux_loss(routed: list[nn.Module], call_kwargs: dict, outputs):
    """Put the load-balancing loss of the routed layers' last call into the call's `outputs` (a ModelOutput /
    dict): always as `router_aux_loss`, and times each adapter's coefficient into `loss` when the call had labels."""
    if not isinstance(outputs, dict):
        return outputs
    losses = router_aux_loss(routed)
    if losses is None:
        return outputs
    weighted, raw = losses
    if call_kwargs.get("labels") is not None and outputs.get("loss") is not None:
        if (
            torch.is_grad_enabled()
            and outputs["loss"].requires_grad
            and not weighted.requires_grad
            and any(r.aux_loss_coef > 0 for layer in routed for r in layer.routing_records.values())
        ):
            raise RuntimeError(
                "The router load-balancing loss cannot get gradients: the routed layers ran without autograd, "
                "which is what reentrant gradient checkpointing does. Enable checkpointing with "
                "`gradient_checkpointing_kwargs={'use_reentrant': False}` (in TrainingArguments, "
                "`model.gradient_checkpointing_enable(...)` or `prepare_model_for_kbit_training(...)`), or set "
                "`router_aux_loss_coef=0`."
            )
        outputs["loss"] = outputs["loss"] + weighted.to(outputs["loss"].device)
    outputs["router_aux_loss"] = raw
    return outputs
