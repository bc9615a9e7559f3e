"""MoExtend routing over old + new experts (Zhong et al. 2024, Sec. 3.3).

Einstein notation: t - tokens, h - hidden, e - old experts, n - new experts, k - top-k slots.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..moe_families import MoEFamily


def calibration_correction(probs: torch.Tensor, weight_in: torch.Tensor, weight_out: torch.Tensor) -> torch.Tensor:
    """The paper's calibration MLP `Linear(e+n, d, no bias) -> GELU -> Linear(d, e+n, no bias)`.

    probs: `(t, e+n)`; weight_in: `(d, e+n)`; weight_out: `(e+n, d)`, zero-initialised so that the correction starts
    at zero. Returns the correction `(t, e+n)` added to the probabilities (d = 16 in the paper).
    """
    return F.linear(F.gelu(F.linear(probs, weight_in)), weight_out)


def extended_routing(
    family: MoEFamily,
    base_logits: torch.Tensor,
    new_logits: torch.Tensor,
    top_k: int,
    renormalize: bool,
    calibration: Callable[[torch.Tensor], torch.Tensor] | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Route over old + new experts.

    base_logits: `(t, e)`, new_logits: `(t, n)`. Top-k is chosen as the family chooses it (softmax families: on the
    uncalibrated probabilities p; Llama 4: on the logits, p being their sigmoid); the weights are
    `p' = p + calibration(p)` taken at the top-k indices and, for families that renormalise, divided by their sum —
    as in the paper's code. `calibration` maps p `(t, e+n)` to its float32 correction (e.g. `calibration_correction`
    with a layer's weights), or None. A new logit of -inf (a token a stage of new experts does not serve) gives p = 0.
    Returns logits `(t, e+n)`, top-k indices `(t, k)` and top-k weights `(t, k)` (float32).
    """
    logits = torch.cat([base_logits, new_logits.to(base_logits.dtype)], dim=-1)  # (t, e+n)
    probs = family.probabilities(logits)  # (t, e+n), float32
    top_k_index = family.top_k_index(logits, top_k, probs)  # (t, k)
    if calibration is not None:
        probs = probs + calibration(probs)
    top_k_weights = probs.gather(1, top_k_index)  # (t, k)
    if renormalize:
        top_k_weights = top_k_weights / top_k_weights.sum(dim=-1, keepdim=True)
    return logits, top_k_index, top_k_weights
