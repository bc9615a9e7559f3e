"""MoExtend routing over old + new experts (Zhong et al. 2024, Sec. 3.3).

Einstein notation: t - tokens, h - hidden, e - old experts, n - new experts, k - top-k slots.
"""

from __future__ import annotations

import torch
from torch import nn

from ..moe_families import MoEFamily


class CalibrationMLP(nn.Module):
    """`Linear(e+n, d, no bias) -> GELU -> Linear(d, e+n, no bias)` over routing probabilities.

    The paper uses d = 16 and adds the output to the probabilities; the last layer starts at zero, so the module
    starts as the identity correction (no change to the routing weights).
    """

    def __init__(self, num_experts: int, hidden_size: int) -> None:
        super().__init__()
        self.hidden_proj = nn.Linear(num_experts, hidden_size, bias=False)
        self.act = nn.GELU()
        self.output_proj = nn.Linear(hidden_size, num_experts, bias=False)
        nn.init.zeros_(self.output_proj.weight)

    def forward(self, probs: torch.Tensor) -> torch.Tensor:
        """probs: `(t, e+n)`; returns the correction `(t, e+n)`."""
        return self.output_proj(self.act(self.hidden_proj(probs)))


def extended_routing(
    family: MoEFamily,
    base_logits: torch.Tensor,
    new_logits: torch.Tensor,
    top_k: int,
    renormalize: bool,
    calibration: CalibrationMLP | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Route over old + new experts.

    base_logits: `(t, e)`, new_logits: `(t, n)`. Top-k is chosen on the uncalibrated probabilities p (the family's
    own scoring: softmax, or sigmoid for Llama 4); the weights are `p' = p + calibration(p)` taken at the top-k
    indices and, for families that renormalise, divided by their sum — as in the paper's code.
    Returns logits `(t, e+n)`, top-k indices `(t, k)` and top-k weights `(t, k)` (float32).
    """
    logits = torch.cat([base_logits, new_logits.to(base_logits.dtype)], dim=-1)  # (t, e+n)
    probs = family.probabilities(logits)  # (t, e+n), float32
    top_k_index = torch.topk(probs, top_k, dim=-1).indices  # (t, k)
    if calibration is not None:
        probs = probs + calibration(probs.to(calibration.output_proj.weight.dtype)).float()
    top_k_weights = probs.gather(1, top_k_index)  # (t, k)
    if renormalize:
        top_k_weights = top_k_weights / top_k_weights.sum(dim=-1, keepdim=True)
    return logits, top_k_index, top_k_weights
