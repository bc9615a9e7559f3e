"""Shared expert math: Kaiming init of stacked low-rank experts, the gated low-rank mixture, and the gathered,
batched computation of a small set of added experts.

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
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def kaiming_uniform_experts(num_experts: int, rank: int, in_features: int) -> torch.Tensor:
    """`(num_experts * rank, in_features)` stacked down-projections of low-rank experts, each initialised like a
    LoRA A matrix (Kaiming-uniform with a = sqrt(5); the fan-in is `in_features` for one expert as for the stack, so
    one call initialises every expert alike)."""
    weight = torch.empty(num_experts * rank, in_features)
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    return weight


def gated_low_rank_mixture(
    inputs: torch.Tensor, weight_a: torch.Tensor, weight_b: torch.Tensor, gates: torch.Tensor, scaling: float
) -> torch.Tensor:
    """`scaling * B (gates (x) A x)`: `e` rank-`r` experts stacked as one rank-`e*r` LoRA, each expert's hidden
    vector weighted by its gate between the two projections (SMoLA, CMoE). A scaling of 1 is skipped (exactly).

    inputs: `(..., i)`; weight_a: `(e*r, i)`; weight_b: `(o, e*r)`; gates: `(..., e)`. Returns `(..., o)`.
    """
    num_experts = gates.shape[-1]
    hidden = F.linear(inputs, weight_a).unflatten(-1, (num_experts, weight_a.shape[0] // num_experts))  # (..., e, r)
    mixed = F.linear((hidden * gates.unsqueeze(-1)).flatten(-2), weight_b)
    return mixed if scaling == 1.0 else mixed * scaling


@dataclass
class FullExperts:
    """Added experts with weights of their own, in the base experts' layout.

    gate_up_proj: `(n, 2i, h)` (`(n, h, 2i)` if transposed); down_proj: `(n, h, i)` (`(n, i, h)` if transposed).
    """

    gate_up_proj: torch.Tensor
    down_proj: torch.Tensor
    is_transposed: bool = False

    @property
    def dtype(self) -> torch.dtype:
        return self.gate_up_proj.dtype

    @property
    def num_experts(self) -> int:
        return self.gate_up_proj.shape[0]

    def gate_up(self, x: torch.Tensor) -> torch.Tensor:
        """`(n, c, h)` -> `(n, c, 2i)`."""
        return torch.bmm(x, self.gate_up_proj if self.is_transposed else self.gate_up_proj.transpose(1, 2))

    def down(self, x: torch.Tensor) -> torch.Tensor:
        """`(n, c, i)` -> `(n, c, h)`."""
        return torch.bmm(x, self.down_proj if self.is_transposed else self.down_proj.transpose(1, 2))


@dataclass
class LowRankExperts:
    """Added experts that share one frozen source expert and each add a trainable rank-r delta to its projections:
    `gate_up_e(x) = x W_src + (x A_e^T) B_e^T`, likewise for `down` (LoRA on the source expert, one per new expert).

    source_gate_up: `(2i, h)` (`(h, 2i)` if transposed); source_down: `(h, i)` (`(i, h)`); gate_up_a: `(n, r, h)`;
    gate_up_b: `(n, 2i, r)`; down_a: `(n, r, i)`; down_b: `(n, h, r)`. B is zero-initialised, so a new expert starts
    as an exact copy of the source.
    """

    source_gate_up: torch.Tensor
    source_down: torch.Tensor
    gate_up_a: torch.Tensor
    gate_up_b: torch.Tensor
    down_a: torch.Tensor
    down_b: torch.Tensor
    is_transposed: bool = False

    @property
    def dtype(self) -> torch.dtype:
        return self.gate_up_a.dtype

    @property
    def num_experts(self) -> int:
        return self.gate_up_a.shape[0]

    def _project(self, x: torch.Tensor, source: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        shared = x @ (source if self.is_transposed else source.t()).to(x.dtype)  # (n, c, out)
        return shared + torch.bmm(torch.bmm(x, a.transpose(1, 2)), b.transpose(1, 2))

    def gate_up(self, x: torch.Tensor) -> torch.Tensor:
        """`(n, c, h)` -> `(n, c, 2i)`."""
        return self._project(x, self.source_gate_up, self.gate_up_a, self.gate_up_b)

    def down(self, x: torch.Tensor) -> torch.Tensor:
        """`(n, c, i)` -> `(n, c, h)`."""
        return self._project(x, self.source_down, self.down_a, self.down_b)


AddedExperts = FullExperts | LowRankExperts


def grouped_expert_forward(
    hidden: torch.Tensor,
    expert_index: torch.Tensor,
    experts: AddedExperts,
    apply_gate: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Gated FFN of added expert `expert_index[r]` on row `hidden[r]`.

    hidden: `(r, h)`; expert_index: `(r,)` in `[0, n)`; apply_gate maps `(..., 2i)` to `(..., i)`. Returns `(r, h)`.
    """
    num_experts = experts.num_experts
    if num_experts == 1:
        return experts.down(apply_gate(experts.gate_up(hidden.unsqueeze(0))))[0]
    order = torch.argsort(expert_index, stable=True)  # (r,)
    sorted_expert = expert_index[order]
    counts = torch.bincount(expert_index, minlength=num_experts)  # (n,)
    group_start = torch.cumsum(counts, 0) - counts
    slot = torch.arange(order.numel(), device=hidden.device) - group_start[sorted_expert]  # row within its group
    capacity = int(counts.max()) if order.numel() else 0
    padded = hidden.new_zeros(num_experts, capacity, hidden.shape[-1])  # (n, c, h)
    padded[sorted_expert, slot] = hidden[order]
    out_padded = experts.down(apply_gate(experts.gate_up(padded)))  # (n, c, h)
    out = torch.empty_like(hidden)
    out[order] = out_padded[sorted_expert, slot]
    return out


def added_experts_forward(
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    first_expert: int,
    experts: AddedExperts,
    apply_gate: Callable[[torch.Tensor], torch.Tensor],
    weights_scale_input: bool = False,
) -> torch.Tensor:
    """Weighted output of the added experts `experts`, whose ids in `top_k_index` are `first_expert` to
    `first_expert + experts.num_experts - 1`.

    hidden: `(t, h)`; top_k_index, top_k_weights: `(t, k)`. Returns `(t, h)`, exactly zero for tokens that did not
    choose one of these experts.
    """
    chosen = (top_k_index >= first_expert) & (top_k_index < first_expert + experts.num_experts)  # (t, k)
    token_pos, slot_pos = torch.nonzero(chosen, as_tuple=True)  # (r,), (r,)
    out = torch.zeros_like(hidden)
    # No early exit when r == 0: the empty matmuls keep the added experts in the autograd graph (zero gradients),
    # which DDP needs to see every trainable parameter used in every step.
    rows = hidden[token_pos].to(experts.dtype)  # (r, h)
    weights = top_k_weights[token_pos, slot_pos].to(experts.dtype).unsqueeze(-1)  # (r, 1)
    if weights_scale_input:
        rows = rows * weights
    expert_out = grouped_expert_forward(rows, top_k_index[token_pos, slot_pos] - first_expert, experts, apply_gate)
    if not weights_scale_input:
        expert_out = expert_out * weights
    return out.index_add(0, token_pos, expert_out.to(hidden.dtype))
