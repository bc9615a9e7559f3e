"""Configuration of Omni-SMoLA: soft mixtures of low-rank experts with per-modality expert groups."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ..config_utils import ExpertConfig, strict_options
from ..modality import MODALITIES, validate_modalities
from ..registration import METHODS, ExpertPeftType

MULTIMODAL = "multimodal"
ROUTERS = ("soft", "top_k")
MIN_ROUTER_TEMPERATURE = 1e-3


@strict_options
@dataclass
class SMoLAConfig(ExpertConfig):
    """Configuration of [`SMoLAModel`] (Wu et al., 2023, "Omni-SMoLA: Boosting Generalist Multimodal Models with Soft
    Mixture of Low-rank Experts", arXiv 2312.00968).

    On every target linear layer `y = W x + scaling * sum_g [token in g] sum_{e in g} gate_e(x) B_e A_e x`: groups of
    rank-`r` experts, each group acting only on the tokens of its modality (`"multimodal"` acts on all tokens), mixed
    by a per-group softmax over a learned router.

    Args:
        r: Rank of every expert.
        expert_groups: Experts per group, e.g. `{"text": 4, "image": 4, "multimodal": 4}`. Group names are
            modalities (`"text"`, `"image"`, `"video"`, `"audio"`) or `"multimodal"`. Experts are laid out group
            by group in that order (text, image, video, audio, multimodal), whatever the dict order.
        router: `"soft"` (the paper: softmax over the group's experts, every token mixes all of them) or `"top_k"`
            (each token mixes only its `top_k` best experts per group, softmax over those; with `top_k=1` the gate
            is the chosen expert's probability, as in the Switch Transformer, so the router learns from the task).
        top_k: Experts per token and group for `router="top_k"`; must not exceed the smallest group.
        router_temperature: Router logits are divided by it before the softmax (at least 1e-3).
        lora_alpha: Scaling numerator: the mixture is scaled by `lora_alpha / r`, as in LoRA.
        dropout: Dropout on the input of the experts.
        target_modules: Modules to adapt (names, or a regex). None: the attention and MLP projections of the
            language model (never the vision/audio tower). Name tower modules explicitly to adapt them too; their
            tokens all count as the tower's modality.
        router_aux_loss_coef: Load-balancing loss coefficient for `router="top_k"` (0 disables; unused for "soft").
    """

    method_name: ClassVar[str] = METHODS[ExpertPeftType.SMOLA].name

    r: int = field(default=4, metadata={"help": "Rank of every low-rank expert."})
    expert_groups: dict[str, int] = field(
        default_factory=lambda: {"text": 4, "image": 4, MULTIMODAL: 4},
        metadata={"help": "Experts per group; group names are modalities or 'multimodal' (all tokens)."},
    )
    router: str = field(default="soft", metadata={"help": "'soft' (paper) or 'top_k'."})
    top_k: int = field(default=2, metadata={"help": "Experts per token and group for router='top_k'."})
    router_temperature: float = field(default=1.0, metadata={"help": "Router logits are divided by it."})
    lora_alpha: float = field(default=8.0, metadata={"help": "The mixture is scaled by lora_alpha / r."})
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the experts' input."})
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Modules to adapt; None = the language model's attention/MLP projections."}
    )
    router_aux_loss_coef: float = field(
        default=1e-3, metadata={"help": "Load-balancing loss coefficient for router='top_k'."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = ExpertPeftType.SMOLA
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {self.r!r}.")
        if not isinstance(self.expert_groups, dict) or not self.expert_groups:
            raise ValueError(f"`expert_groups` must be a non-empty dict group -> experts, got {self.expert_groups!r}.")
        validate_modalities(self.expert_groups, "expert_groups", also_allowed=(MULTIMODAL,))
        empty = [g for g, n in self.expert_groups.items() if not isinstance(n, int) or isinstance(n, bool) or n < 1]
        if empty:
            raise ValueError(
                f"`expert_groups` groups {empty} must have at least one expert (a positive integer), "
                f"got {self.expert_groups!r}."
            )
        # Experts are laid out group by group in this canonical order, whatever the dict order (adapter_config.json
        # is written with sorted keys, so the order must not depend on it).
        self.expert_groups = {g: self.expert_groups[g] for g in (*MODALITIES, MULTIMODAL) if g in self.expert_groups}
        if self.router not in ROUTERS:
            raise ValueError(f"`router` must be one of {ROUTERS}, got {self.router!r}.")
        if self.router == "top_k":
            smallest = min(self.expert_groups.values())
            if not isinstance(self.top_k, int) or not 1 <= self.top_k <= smallest:
                raise ValueError(
                    f"`top_k` must be between 1 and the smallest group's size ({smallest}), got {self.top_k!r}."
                )
        if not self.router_temperature >= MIN_ROUTER_TEMPERATURE:
            raise ValueError(
                f"`router_temperature` must be >= {MIN_ROUTER_TEMPERATURE} (smaller values overflow the router "
                f"softmax), got {self.router_temperature!r}."
            )
        if not 0 <= self.dropout < 1:
            raise ValueError(f"`dropout` must be in [0, 1), got {self.dropout!r}.")
        if self.router_aux_loss_coef < 0:
            raise ValueError(f"`router_aux_loss_coef` must be >= 0, got {self.router_aux_loss_coef!r}.")

    @property
    def num_experts(self) -> int:
        return sum(self.expert_groups.values())
