"""PTL, the probabilistic task locator: one density model of the input representation per task.

The representation of a sample is pooled from its input to the adapter's first layer (which no adapter of its own
precedes): the mean over all tokens ("mean"), or the mean over text tokens next to the mean over media tokens
("by_modality", so that the media content is not diluted by the question's text). Density models:
- "vae" trains a small VAE per task and scores a sample by the negative reconstruction error of its mean latent
  (the paper's choice);
- "gaussian" scores by a diagonal Gaussian's log-likelihood;
- "mahalanobis" scores by a full-covariance Gaussian's log-likelihood, the covariance shrunk towards a scaled
  identity (regularised QDA; tasks that differ in the correlations of features, not only in their means, separate).
Each task's model is stored as one flat vector so that it saves like any adapter tensor.

A task can also reject samples: `rejection_threshold` is a low quantile of the cross-validated scores of the task's
own inputs (each scored by a model fitted without it), lowered by half the spread to the median; a sample that no
task's score reaches belongs to none of them.

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


SHRINKAGE = 0.1  # weight of the scaled identity in the "mahalanobis" covariance


def locator_size(kind: str, features: int, latent: int) -> int:
    """Length of the flat vector holding one task's density model."""
    if kind == "gaussian":
        return 2 * features
    if kind == "mahalanobis":
        return features + features * features + 1  # mean, inverse covariance, log-determinant
    return sum(torch.Size(s).numel() for s in _vae_shapes(features, latent))


def fit_task_model(kind: str, pooled: torch.Tensor, latent: int, epochs: int, seed: int = 0) -> torch.Tensor:
    """Fit one task's density model to `(b, f)` pooled representations; returns its flat vector."""
    pooled = pooled.float()
    mean, std = pooled.mean(0), pooled.std(0, unbiased=False).clamp_min(1e-4)
    if kind == "gaussian":
        return torch.cat([mean, std.log()])
    if kind == "mahalanobis":
        centered = pooled - mean
        covariance = centered.T @ centered / pooled.shape[0]
        scale = covariance.diagonal().mean().clamp_min(1e-8)
        eye = torch.eye(pooled.shape[1])
        covariance = (1 - SHRINKAGE) * covariance + SHRINKAGE * scale * eye
        precision = torch.linalg.inv(covariance)
        return torch.cat([mean, precision.reshape(-1), torch.logdet(covariance).reshape(1)])
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
    features = pooled.shape[1]
    for vector in models:
        if kind == "gaussian":
            mean, log_std = vector.float().chunk(2)
            scores.append(-(((pooled - mean) / log_std.exp()) ** 2 / 2 + log_std).sum(-1))
            continue
        if kind == "mahalanobis":
            mean, precision, log_det = vector.float().split([features, features * features, 1])
            centered = pooled - mean
            distance = (centered @ precision.view(features, features) * centered).sum(-1)  # (b,)
            scores.append(-(distance + log_det) / 2)
            continue
        mean, std, *params = _unflatten(vector.float(), _vae_shapes(pooled.shape[1], latent))
        standardized = (pooled - mean) / std
        _, _, reconstruction = _vae(standardized, params, latent)
        # error measured in the raw feature space, so that every task's VAE is compared on the same scale
        scores.append(-((reconstruction * std + mean - pooled) ** 2).sum(-1))
    return torch.stack(scores, dim=-1)


def rejection_threshold(
    kind: str, pooled: torch.Tensor, latent: int, epochs: int, quantile: float, folds: int = 5
) -> float:
    """The score below which a sample is not the task's, from `(b, f)` inputs of the task: each input is scored by a
    model fitted without it (`folds`-fold cross-validation, so the scores are those of unseen inputs, not the
    optimistic ones of the training inputs); the threshold is their `quantile`, lowered by half its distance to their
    median."""
    order = torch.randperm(pooled.shape[0], generator=torch.Generator().manual_seed(0))
    held_out_scores = []
    for fold in order.chunk(min(folds, pooled.shape[0])):
        rest = order[~torch.isin(order, fold)]
        if rest.numel() < 2:
            continue
        model = fit_task_model(kind, pooled[rest], latent, epochs)
        held_out_scores.append(task_scores(kind, pooled[fold], [model], latent)[:, 0])
    scores = torch.cat(held_out_scores)
    low, median = torch.quantile(scores.float(), torch.tensor([quantile, 0.5])).tolist()
    return low - 0.5 * (median - low)


def locate(scores: torch.Tensor, thresholds: list[float | None]) -> torch.Tensor:
    """`(b,)` task index per sample from `(b, tasks)` scores: the best-scoring task among those whose threshold the
    sample reaches (a task without a threshold claims every sample); -1 where no task claims the sample."""
    limits = torch.tensor([float("-inf") if t is None else t for t in thresholds], device=scores.device)
    claimed = scores >= limits  # (b, tasks)
    best = scores.masked_fill(~claimed, float("-inf")).argmax(dim=-1)
    return torch.where(claimed.any(dim=-1), best, -1)
