"""PathWeave's gate over a modality stage's adapters: the reference code's noisy top-k gating.

Reference: JiazuoYu/PathWeave, `lavis/models/blip2_models/Qformer.py`, `BertSelfAttention.noisy_top_k_gating`
(Shazeer et al. 2017's noisy top-k gate with `noise_epsilon = 1e-2`, gate and noise matrices zero initialised).

Einstein notation: t - tokens, i - in features, a - adapters of the stage.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NOISE_EPSILON = 1e-2  # the reference's `noise_epsilon` default: the noise never vanishes while training


def noisy_top_k_gates(
    x: torch.Tensor,
    gate_weight: torch.Tensor,
    noise_weight: torch.Tensor | None,
    top_k: int | None,
    training: bool,
) -> torch.Tensor:
    """`(t, a)` gate weights of the stage's adapters for tokens `x` `(t, i)`.

    `logits = x W_gate^T` `(a, i)`; while `training` and `noise_weight` `(a, i)` is given, each logit gets
    `N(0, 1) * (softplus(x W_noise^T) + 0.01)` added. The `top_k` largest logits per token are softmaxed and the
    others get weight 0; `top_k=None` (the reference's `k = num_experts`) keeps all adapters: a dense softmax. In eval
    (or without `noise_weight`) the gate is deterministic.
    """
    logits = F.linear(x, gate_weight)  # (t, a)
    if training and noise_weight is not None:
        noise_std = F.softplus(F.linear(x, noise_weight)) + NOISE_EPSILON
        logits = logits + torch.randn_like(logits) * noise_std
    if top_k is None or top_k >= logits.shape[-1]:
        return torch.softmax(logits, dim=-1)
    top_logits, top_indices = logits.topk(top_k, dim=-1)  # (t, k)
    return torch.zeros_like(logits).scatter(-1, top_indices, torch.softmax(top_logits, dim=-1))
