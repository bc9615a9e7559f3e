"""Configuration of LLaVA-CMoE: continual mixture of low-rank experts with probe-guided expansion and a task
locator."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ..config_utils import ExpertConfig, strict_options
from ..modality import validate_modalities
from ..registration import METHODS, ExpertPeftType

LOCATORS = ("vae", "gaussian", "mahalanobis")
LOCATOR_FEATURES = ("mean", "by_modality")


@strict_options
@dataclass
class CMoEConfig(ExpertConfig):
    """Configuration of [`CMoEModel`] (LLaVA-CMoE, 2025: replay-free continual instruction tuning).

    Tasks arrive one after another (`model.base_model.add_task(name, probe_data=...)`). Each task adds
    `experts_per_task` rank-`r` experts to the target layers chosen by its probes and owns a router over every expert
    that exists in the layer when it is trained; earlier tasks' experts and routers are frozen, so their outputs
    never change. At inference a locator (one density model of the input representation per task) picks each
    sample's task router when no task is given.

    Args:
        r: Rank of every expert.
        experts_per_task: Experts a task adds to each layer it extends.
        lora_alpha: Expert outputs are scaled by `lora_alpha / r`.
        top_k: None (default): a task's router mixes all its experts densely (softmax). An integer k: each token
            mixes only its k best experts of the task's router (softmax renormalised over them), the sparse routing of
            the paper's MoE layers; at least 1 and at most `experts_per_task`.
        router_aux_loss_coef: With `top_k`, the Switch load-balancing loss of each task router over its experts is
            returned as `outputs.router_aux_loss` and, times this coefficient, added to `outputs.loss` when labels
            are given (0 disables; unused for dense routing, where every expert gets every token).
        target_modules: Linear layers that may receive experts; None: the language model's attention and MLP
            projections.
        probe_threshold: PGKE: a layer gets the new task's experts only if the trained probe expert's routing share
            there (its mean gate over the probe tokens) exceeds its uniform share `u = 1/(e+1)` (e old experts) by
            this fraction of the rest: `share > u + probe_threshold * (1 - u)`; elsewhere the task reuses old experts.
            (An untrained probe sits at `u`; comparing with a fixed share would extend every layer with few old
            experts and decide by noise with more.) The default 0 extends where the probe is used more than chance:
            a margin of 0.2 left later tasks of the demo too few new experts to learn (75% / 50% instead of 100%).
        probe_steps: Training steps of the probe experts on the probe data.
        probe_learning_rate: Learning rate of the probe training.
        locator: "vae" (a small VAE per task, lowest reconstruction error wins, as in the paper), "gaussian" (a
            diagonal Gaussian per task, highest likelihood wins) or "mahalanobis" (a full-covariance Gaussian per
            task, shrunk towards a scaled identity).
        locator_features: What the locator sees of a sample's input to the adapter's first layer: "mean" (the mean
            over all tokens) or "by_modality" (the mean over text tokens next to the mean over media tokens).
        locator_reject: Each task's locator also learns which inputs are not its own (its training inputs' scores
            set a threshold); an input that no task claims takes the base model's path, with no expert.
        locator_reject_quantile: The quantile of a task's own training scores its threshold starts from (see
            `cmoe.locator.rejection_threshold`).
        locator_latent_size: Latent size of each task's VAE.
        locator_epochs: Training epochs of each task's VAE.
        restrict_to_modalities: If set (e.g. `["image"]`), the experts act only on tokens of these modalities (from
            the model's placeholder tokens or an explicit `modality_ids`); every other token takes the base model's
            computation, so text-only inputs give exactly the base model's outputs whatever task is chosen.
        tasks: Filled in by `add_task`: `[{"name": ..., "layers": [extended module names]}, ...]` in order. Saved
            with the adapter so that loading rebuilds every task.
    """

    method_name: ClassVar[str] = METHODS[ExpertPeftType.CMOE].name

    r: int = field(default=8, metadata={"help": "Rank of every expert."})
    experts_per_task: int = field(default=2, metadata={"help": "Experts a task adds to each layer it extends."})
    lora_alpha: float = field(default=16.0, metadata={"help": "Expert outputs are scaled by lora_alpha / r."})
    top_k: int | None = field(
        default=None, metadata={"help": "None = dense routing in a task; k = each token mixes its top-k experts."}
    )
    router_aux_loss_coef: float = field(
        default=1e-3, metadata={"help": "Load-balancing loss coefficient for top_k routing."}
    )
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Layers that may receive experts; None = the language model's projections."}
    )
    probe_threshold: float = field(
        default=0.0, metadata={"help": "PGKE: how far above its uniform share the probe's routing share must be."}
    )
    probe_steps: int = field(default=10, metadata={"help": "Training steps of the probe experts."})
    probe_learning_rate: float = field(default=1e-2, metadata={"help": "Learning rate of the probe training."})
    locator: str = field(default="vae", metadata={"help": "'vae' (paper), 'gaussian' or 'mahalanobis'."})
    locator_features: str = field(default="mean", metadata={"help": "'mean' or 'by_modality' pooling."})
    locator_reject: bool = field(default=True, metadata={"help": "Inputs no task claims take the base path."})
    locator_reject_quantile: float = field(default=0.01, metadata={"help": "Own-score quantile of the threshold."})
    locator_latent_size: int = field(default=16, metadata={"help": "Latent size of each task's VAE."})
    locator_epochs: int = field(default=200, metadata={"help": "Training epochs of each task's VAE."})
    restrict_to_modalities: list[str] | None = field(
        default=None, metadata={"help": "Modalities whose tokens the experts act on; None = all tokens."}
    )
    tasks: list[dict] = field(default_factory=list, metadata={"help": "Filled in by add_task; do not set."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = ExpertPeftType.CMOE
        for option in ("r", "experts_per_task", "probe_steps", "locator_latent_size", "locator_epochs"):
            value = getattr(self, option)
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if option == "probe_steps" else 1):
                raise ValueError(f"`{option}` must be a positive integer, got {value!r}.")
        if self.top_k is not None and (
            not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 1
        ):
            raise ValueError(
                f"`top_k` must be None (dense routing) or a positive integer at most `experts_per_task`, got "
                f"{self.top_k!r}."
            )
        if self.top_k is not None and self.top_k > self.experts_per_task:
            raise ValueError(
                f"`top_k` ({self.top_k}) must not exceed `experts_per_task` ({self.experts_per_task}): a task "
                "adding experts routes each token to top_k of them. Lower `top_k` or raise `experts_per_task`."
            )
        if not self.router_aux_loss_coef >= 0:
            raise ValueError(f"`router_aux_loss_coef` must be >= 0, got {self.router_aux_loss_coef!r}.")
        if not 0 <= self.probe_threshold <= 1:
            raise ValueError(f"`probe_threshold` must be in [0, 1], got {self.probe_threshold!r}.")
        if not self.probe_learning_rate > 0:
            raise ValueError(f"`probe_learning_rate` must be > 0, got {self.probe_learning_rate!r}.")
        if self.locator not in LOCATORS:
            raise ValueError(f"`locator` must be one of {LOCATORS}, got {self.locator!r}.")
        if self.locator_features not in LOCATOR_FEATURES:
            raise ValueError(f"`locator_features` must be one of {LOCATOR_FEATURES}, got {self.locator_features!r}.")
        if not 0 <= self.locator_reject_quantile < 0.5:
            raise ValueError(f"`locator_reject_quantile` must be in [0, 0.5), got {self.locator_reject_quantile!r}.")
        if self.restrict_to_modalities is not None:
            modalities = validate_modalities(self.restrict_to_modalities, "restrict_to_modalities")
            self.restrict_to_modalities = list(modalities)
            if not self.restrict_to_modalities:
                raise ValueError("`restrict_to_modalities` must name at least one modality, or be None.")
        names = [task.get("name") for task in self.tasks]
        if len(set(names)) != len(names) or not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"`tasks` must have unique, non-empty names, got {names}.")
