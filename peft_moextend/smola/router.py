"""Per-group routing of SMoLA (soft, as in the paper, or top-k within each group).

Einstein notation: t - tokens, e - experts (all groups), g - groups.
"""

from __future__ import annotations

import torch


def group_softmax(
    logits: torch.Tensor, expert_group: torch.Tensor, num_groups: int, group_sizes: list[int] | None = None
) -> torch.Tensor:
    """Softmax over the experts of each group separately.

    logits: `(t, e)`; expert_group: `(e,)` group index of every expert; `group_sizes`, when the groups are
    contiguous (as SMoLA's config lays them out), their sizes: then one softmax per slice (fewer kernels per
    decoding step). Returns `(t, e)`: for every token the weights of each group's experts sum to one. Entries at
    -inf get weight 0.
    """
    if group_sizes is not None:
        return torch.cat([part.softmax(dim=-1) for part in logits.split(group_sizes, dim=-1)], dim=-1)
    index = expert_group.expand_as(logits)
    group_max = logits.new_full((logits.shape[0], num_groups), float("-inf")).scatter_reduce(
        1, index, logits, reduce="amax"
    )  # (t, g)
    exp = torch.exp(logits - group_max.gather(1, index))  # (t, e)
    group_sum = exp.new_zeros(logits.shape[0], num_groups).index_add(1, expert_group, exp)  # (t, g)
    return exp / group_sum.gather(1, index)


def group_top_k_mask(logits: torch.Tensor, expert_group: torch.Tensor, top_k: int) -> torch.Tensor:
    """`(t, e)` bool: the `top_k` largest logits of each group, per token (ties: lower expert index first)."""
    same_group = expert_group[:, None] == expert_group[None, :]  # (e, e)
    # expert j outranks expert i when its logit is larger, or equal with a lower index
    larger = logits[:, None, :] > logits[:, :, None]  # (t, i, j)
    tie_before = (logits[:, None, :] == logits[:, :, None]) & torch.ones_like(same_group).tril(-1)
    rank = ((larger | tie_before) & same_group).sum(dim=-1)  # (t, e)
    return rank < top_k


def route(
    logits: torch.Tensor,
    expert_group: torch.Tensor,
    num_groups: int,
    top_k: int | None,
    group_sizes: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Gates `(t, e)`, the `(t, e)` bool dispatch mask and the `(t, e)` per-group softmax probabilities of a soft
    (top_k None: gates = probabilities, dispatch None, every token uses every expert) or per-group top-k router.
    Top-k gates are the probabilities renormalised over the chosen experts; with `top_k=1` the gate is the chosen
    expert's probability itself (Switch Transformer), since a renormalised single gate is 1 and leaves the router
    no gradient from the task loss. `group_sizes`: see `group_softmax`."""
    probabilities = group_softmax(logits, expert_group, num_groups, group_sizes)
    if top_k is None:
        return probabilities, None, probabilities
    selected = group_top_k_mask(logits, expert_group, top_k)
    if top_k == 1:
        return probabilities * selected, selected, probabilities
    gates = group_softmax(logits.masked_fill(~selected, float("-inf")), expert_group, num_groups, group_sizes)
    return gates, selected, probabilities
