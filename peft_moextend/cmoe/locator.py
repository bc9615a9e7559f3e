"""PTL, the probabilistic task locator: one density model of the input representation per task.

The representation of a sample is its mean-pooled input to the first adapted layer (the language model's first
projection, which no adapter precedes). "vae" trains a small VAE per task and scores a sample by the negative
reconstruction error of its mean latent (the paper's choice); "gaussian" scores by a diagonal Gaussian's
log-likelihood. Each task's model is stored as one flat vector so that it saves like any adapter tensor.

Einstein notation: b - samples, f - features, z - latent, d - VAE hidden width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

VAE_HIDDEN = 64


def _vae_shapes(features: int, latent: int) -> list[tuple[int, ...]]:
    return [
        (features,),
        (features,),  # input standardisation: mean, std
        (VAE_HIDDEN, features),
        (VAE_HIDDEN,),
        (2 * latent, VAE_HIDDEN),
        (2 * latent,),  # encoder
        (VAE_HIDDEN, latent),
        (VAE_HIDDEN,),
        (features, VAE_HIDDEN),
        (features,),  # decoder
    ]


def _unflatten(vector: torch.Tensor, shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
    sizes = [torch.Size(s).numel() for s in shapes]
    return [part.view(shape) for part, shape in zip(vector.split(sizes), shapes)]


def locator_size(kind: str, features: int, latent: int) -> int:
    """Length of the flat vector holding one task's density model."""
    if kind == "gaussian":
        return 2 * features
    return sum(torch.Size(s).numel() for s in _vae_shapes(features, latent))


def fit_task_model(kind: str, pooled: torch.Tensor, latent: int, epochs: int, seed: int = 0) -> torch.Tensor:
    """Fit one task's density model to `(b, f)` pooled representations; returns its flat vector."""
    pooled = pooled.float()
    mean, std = pooled.mean(0), pooled.std(0, unbiased=False).clamp_min(1e-4)
    if kind == "gaussian":
        return torch.cat([mean, std.log()])
    generator = torch.Generator().manual_seed(seed)
    shapes = _vae_shapes(pooled.shape[1], latent)
    params = [
        torch.randn(s, generator=generator) * (1 / s[-1] ** 0.5) if len(s) == 2 else torch.zeros(s) for s in shapes[2:]
    ]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=3e-3)
    standardized = (pooled - mean) / std
    with torch.enable_grad():
        for _ in range(epochs):
            optimizer.zero_grad()
            mu, log_var, reconstruction = _vae(standardized, params, latent, sample=True, generator=generator)
            kl = -0.5 * (1 + log_var - mu.pow(2) - log_var.exp()).sum(-1).mean()
            loss = F.mse_loss(reconstruction, standardized, reduction="none").sum(-1).mean() + kl
            loss.backward()
            optimizer.step()
    return torch.cat([mean, std, *[p.detach().reshape(-1) for p in params]])


def _vae(x, params, latent, sample=False, generator=None):
    enc1, enc1_b, enc2, enc2_b, dec1, dec1_b, dec2, dec2_b = params
    mu, log_var = F.linear(F.gelu(F.linear(x, enc1, enc1_b)), enc2, enc2_b).split(latent, dim=-1)
    z = mu + torch.randn(mu.shape, generator=generator) * (0.5 * log_var).exp() if sample else mu
    return mu, log_var, F.linear(F.gelu(F.linear(z, dec1, dec1_b)), dec2, dec2_b)


def task_scores(kind: str, pooled: torch.Tensor, models: list[torch.Tensor], latent: int) -> torch.Tensor:
    """`(b, tasks)` scores of each sample under each task's model; the best task has the highest score."""
    pooled = pooled.float()
    scores = []
    for vector in models:
        if kind == "gaussian":
            mean, log_std = vector.float().chunk(2)
            scores.append(-(((pooled - mean) / log_std.exp()) ** 2 / 2 + log_std).sum(-1))
            continue
        mean, std, *params = _unflatten(vector.float(), _vae_shapes(pooled.shape[1], latent))
        standardized = (pooled - mean) / std
        _, _, reconstruction = _vae(standardized, params, latent)
        # error measured in the raw feature space, so that every task's VAE is compared on the same scale
        scores.append(-((reconstruction * std + mean - pooled) ** 2).sum(-1))
    return torch.stack(scores, dim=-1)
