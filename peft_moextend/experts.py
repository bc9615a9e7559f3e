"""Gathered, batched computation of a small set of added experts.

Only the (token, slot) pairs routed to an added expert are computed: they are gathered, grouped per expert into a
padded `(n_experts, capacity, h)` batch and run through two `bmm`s — no dense pass of every expert over every token,
no Python loop over experts or tokens. Capacity is the largest group, so padding costs at most the imbalance
between the added experts (none when there is one).

Einstein notation: t - tokens, h - hidden, i - expert intermediate size, n - added experts, k - top-k slots,
r - routed (token, slot) pairs, c - capacity (rows per expert).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn


def kaiming_uniform_experts(num_experts: int, rank: int, in_features: int) -> torch.Tensor:
    """`(num_experts * rank, in_features)` stacked down-projections of low-rank experts, each initialised like a
    LoRA A matrix (Kaiming-uniform with a = sqrt(5); the fan-in is `in_features` for one expert as for the stack, so
    one call initialises every expert alike)."""
    weight = torch.empty(num_experts * rank, in_features)
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    return weight


def grouped_expert_forward(
    hidden: torch.Tensor,
    expert_index: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    apply_gate: Callable[[torch.Tensor], torch.Tensor],
    is_transposed: bool = False,
) -> torch.Tensor:
    """Gated FFN of expert `expert_index[r]` on row `hidden[r]`.

    hidden: `(r, h)`; expert_index: `(r,)` in `[0, n)`; gate_up_proj: `(n, 2i, h)` (`(n, h, 2i)` if transposed);
    down_proj: `(n, h, i)` (`(n, i, h)` if transposed); apply_gate maps `(..., 2i)` to `(..., i)`. Returns `(r, h)`.
    """
    num_experts = gate_up_proj.shape[0]
    if num_experts == 1:
        gate_up = gate_up_proj[0] if is_transposed else gate_up_proj[0].t()
        down = down_proj[0] if is_transposed else down_proj[0].t()
        return apply_gate(hidden @ gate_up) @ down
    order = torch.argsort(expert_index, stable=True)  # (r,)
    sorted_expert = expert_index[order]
    counts = torch.bincount(expert_index, minlength=num_experts)  # (n,)
    group_start = torch.cumsum(counts, 0) - counts
    slot = torch.arange(order.numel(), device=hidden.device) - group_start[sorted_expert]  # row within its group
    capacity = int(counts.max())
    padded = hidden.new_zeros(num_experts, capacity, hidden.shape[-1])  # (n, c, h)
    padded[sorted_expert, slot] = hidden[order]
    gate_up = gate_up_proj if is_transposed else gate_up_proj.transpose(1, 2)  # (n, h, 2i)
    down = down_proj if is_transposed else down_proj.transpose(1, 2)  # (n, i, h)
    out_padded = torch.bmm(apply_gate(torch.bmm(padded, gate_up)), down)  # (n, c, h)
    out = torch.empty_like(hidden)
    out[order] = out_padded[sorted_expert, slot]
    return out


def added_experts_forward(
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    num_base_experts: int,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    apply_gate: Callable[[torch.Tensor], torch.Tensor],
    is_transposed: bool = False,
    weights_scale_input: bool = False,
) -> torch.Tensor:
    """Weighted output of the added experts (ids `>= num_base_experts` in `top_k_index`).

    hidden: `(t, h)`; top_k_index, top_k_weights: `(t, k)`. Returns `(t, h)`, exactly zero for tokens that did not
    choose an added expert.
    """
    token_pos, slot_pos = torch.nonzero(top_k_index >= num_base_experts, as_tuple=True)  # (r,), (r,)
    out = torch.zeros_like(hidden)
    # No early exit when r == 0: the empty matmuls keep the added experts in the autograd graph (zero gradients),
    # which DDP needs to see every trainable parameter used in every step.
    compute_dtype = gate_up_proj.dtype
    rows = hidden[token_pos].to(compute_dtype)  # (r, h)
    weights = top_k_weights[token_pos, slot_pos].to(compute_dtype).unsqueeze(-1)  # (r, 1)
    if weights_scale_input:
        rows = rows * weights
    expert_out = grouped_expert_forward(
        rows, top_k_index[token_pos, slot_pos] - num_base_experts, gate_up_proj, down_proj, apply_gate, is_transposed
    )
    if not weights_scale_input:
        expert_out = expert_out * weights
    return out.index_add(0, token_pos, expert_out.to(hidden.dtype))
