"""Configuration of MoExtend: new experts and router rows in the MoE layers of a pretrained MoE model."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import ClassVar

from ..config_utils import ExpertConfig, strict_options
from ..modality import validate_modalities
from ..registration import METHODS, ExpertPeftType

EXPERT_INIT_MODES = ("expert_0_until_measured", "zeros")
DEPRECATED_EXPERT_INIT_MODES = {"most_used": "expert_0_until_measured"}
"""Old `expert_init` values still accepted (adapters saved by earlier versions) -> the value they always meant."""
AUX_LOSS_LAYERS = ("extended", "all")


@strict_options
@dataclass
class MoExtendConfig(ExpertConfig):
    """Configuration of [`MoExtendModel`] (Zhong et al., 2024, "MoExtend: Tuning New Experts for Modality and Task
    Extension").

    In every chosen MoE layer, `num_new_experts` experts of the same shape as the existing ones are appended, each
    with a new router row; old experts and old router rows stay frozen. A calibration MLP over the routing
    probabilities (the paper's per-layer calibration module) corrects the weights of the chosen experts.

    Args:
        num_new_experts: New experts per extended layer.
        new_expert_rank: None (default): every new expert is a full copy of its source expert and trains all its
            weights. An int r: a new expert is its source expert's frozen weights (shared with the base, never
            copied; 4-bit when the base experts are) plus a trainable rank-r delta on its gate/up and on its down
            projection (zero-initialised: it starts as an exact copy of the source): `r * (2h + 3i)` trainable
            parameters per new expert instead of `3 h i`.
        target_layers: Decoder-layer indices whose MoE block is extended; None extends every MoE layer. Use
            `peft_moextend.moextend.plan_extension` to choose them by expert-usage shift (the paper's stage 2).
        expert_init: Which expert the new experts (and their router rows) copy. "expert_0_until_measured" (default)
            copies expert 0 of every layer when the adapter is created (a log line says so) until
            `MoExtendModel.init_new_experts_from_data(batches)` measures usage on your data and re-copies each layer's
            most used expert (the paper's choice), recording `{layer_index: expert_index}` here. An int copies that
            expert in every layer, a dict `{layer_index: expert_index}` picks per layer (e.g. `ExtensionPlan.
            source_experts`). "zeros" copies the router row and gate/up projection of the same expert as
            "expert_0_until_measured" but zeroes the down projection (new experts output zero at start, gradients
            still flow). The old name "most_used" is accepted and means "expert_0_until_measured" (deprecated).
        calibration: Add the per-layer calibration MLP `Linear(E+k, 16) -> GELU -> Linear(16, E+k)` (last layer
            zero-initialised, so it starts as the identity on the routing weights).
        calibration_hidden_size: Hidden width of the calibration MLP (16 in the paper).
        router_aux_loss_coef: Coefficient of the load-balancing loss over old + new experts added to `outputs.loss`
            when labels are given (1e-3 in the paper; 0 disables it).
        router_aux_loss_layers: Which MoE layers the load-balancing loss averages over. "extended" (default): the
            layers this adapter extends. "all": every MoE layer, as the paper's code does; layers that are not
            extended contribute the base router's loss over their `E` experts (their routing is the base's, they
            hold nothing trainable; the loss reaches the new experts through the hidden states). Differs from
            "extended" only when `target_layers` leaves some MoE layer unextended.
        restrict_to_modalities: If set (e.g. `["image"]`), new experts are eligible only for tokens of these
            modalities (from the model's placeholder tokens or an explicit `modality_ids`); all other tokens take the
            base model's computation, so text-only inputs give exactly the base model's outputs.
        target_modules: Filled in automatically with the MoE blocks chosen by `target_layers`; do not set it.
        num_base_experts: Filled in automatically: the number of experts of the base model's MoE layers. Loading the
            adapter onto a model with another number of experts raises a clear error.
        hidden_size: Filled in automatically: the base model's hidden size, checked when loading like
            `num_base_experts`.
        stages: Filled in by `MoExtendModel.add_stage` (task or modality extension): the stages of new experts added
            after this config's own (stage 0), one dict each: `{"name", "num_new_experts", "restrict_to_modalities",
            "source_experts": {layer_index: expert_index}}`. Each stage appends experts and router rows to every
            extended layer; earlier stages are frozen and one router routes over the base experts and every stage's.
    """

    method_name: ClassVar[str] = METHODS[ExpertPeftType.MOEXTEND].name

    num_new_experts: int = field(default=1, metadata={"help": "New experts per extended MoE layer."})
    new_expert_rank: int | None = field(
        default=None,
        metadata={"help": "None: full new experts; r: the source expert's frozen weights plus a rank-r delta."},
    )
    target_layers: list[int] | None = field(
        default=None, metadata={"help": "Decoder-layer indices whose MoE block is extended; None = every MoE layer."}
    )
    expert_init: str | int | dict[int, int] = field(
        default="expert_0_until_measured",
        metadata={
            "help": "'expert_0_until_measured' (init_new_experts_from_data copies the most used), 'zeros', an "
            "expert index, or {layer_index: expert_index}."
        },
    )
    calibration: bool = field(default=True, metadata={"help": "Add the per-layer calibration MLP of the paper."})
    calibration_hidden_size: int = field(default=16, metadata={"help": "Hidden width of the calibration MLP."})
    router_aux_loss_coef: float = field(
        default=1e-3, metadata={"help": "Load-balancing loss coefficient over old + new experts (0 disables)."}
    )
    router_aux_loss_layers: str = field(
        default="extended",
        metadata={"help": "MoE layers the load-balancing loss averages over: 'extended' or 'all' (the paper's code)."},
    )
    restrict_to_modalities: list[str] | None = field(
        default=None, metadata={"help": "Modalities whose tokens may use the new experts; None = all tokens."}
    )
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Filled in automatically from `target_layers`; do not set."}
    )
    num_base_experts: int | None = field(
        default=None, metadata={"help": "Filled in automatically: experts per MoE layer of the base model."}
    )
    hidden_size: int | None = field(
        default=None, metadata={"help": "Filled in automatically: hidden size of the base model."}
    )
    stages: list[dict] = field(
        default_factory=list,
        metadata={"help": "Filled in by `add_stage`: later stages of new experts (name, count, modalities, sources)."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = ExpertPeftType.MOEXTEND
        if not isinstance(self.num_new_experts, int) or self.num_new_experts < 1:
            raise ValueError(f"`num_new_experts` must be an integer >= 1, got {self.num_new_experts!r}.")
        if self.new_expert_rank is not None and (
            not isinstance(self.new_expert_rank, int)
            or isinstance(self.new_expert_rank, bool)
            or self.new_expert_rank < 1
        ):
            raise ValueError(
                f"`new_expert_rank` must be None (full new experts) or a positive integer rank, got "
                f"{self.new_expert_rank!r}."
            )
        if self.target_layers is not None:
            if isinstance(self.target_layers, int):
                self.target_layers = [self.target_layers]
            if not self.target_layers or not all(isinstance(i, int) and i >= 0 for i in self.target_layers):
                raise ValueError(
                    "`target_layers` must be None or a non-empty list of layer indices >= 0, "
                    f"got {self.target_layers!r}."
                )
            self.target_layers = sorted(set(self.target_layers))
        self.expert_init = self._normalise_expert_init(self.expert_init)
        if self.new_expert_rank is not None and self.expert_init == "zeros":
            raise ValueError(
                "`expert_init='zeros'` (new experts output zero at start) cannot be expressed by low-rank new experts, "
                "which start as copies of their source expert: use `new_expert_rank=None` or another `expert_init`."
            )
        if self.calibration_hidden_size < 1:
            raise ValueError(f"`calibration_hidden_size` must be >= 1, got {self.calibration_hidden_size}.")
        if self.router_aux_loss_coef < 0:
            raise ValueError(f"`router_aux_loss_coef` must be >= 0, got {self.router_aux_loss_coef}.")
        if self.router_aux_loss_layers not in AUX_LOSS_LAYERS:
            raise ValueError(
                f"`router_aux_loss_layers` must be one of {AUX_LOSS_LAYERS}, got {self.router_aux_loss_layers!r}."
            )
        if self.restrict_to_modalities is not None:
            modalities = validate_modalities(self.restrict_to_modalities, "restrict_to_modalities")
            if not modalities:
                raise ValueError("`restrict_to_modalities` must name at least one modality, or be None.")
            self.restrict_to_modalities = list(modalities)
        self.stages = [self._normalise_stage(stage) for stage in self.stages]
        names = [stage["name"] for stage in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"`stages` must have unique names, got {names}.")

    @staticmethod
    def _normalise_stage(stage: dict) -> dict:
        """A stage record as `add_stage` writes it (JSON turns the layer indices of `source_experts` into strings)."""
        expected = {"name", "num_new_experts", "restrict_to_modalities", "source_experts"}
        if not isinstance(stage, dict) or set(stage) != expected:
            raise ValueError(f"Each entry of `stages` must be a dict with keys {sorted(expected)}, got {stage!r}.")
        if not isinstance(stage["name"], str) or not stage["name"]:
            raise ValueError(f"A stage's `name` must be a non-empty string, got {stage['name']!r}.")
        count = stage["num_new_experts"]
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise ValueError(f"Stage {stage['name']!r}: `num_new_experts` must be an integer >= 1, got {count!r}.")
        modalities = stage["restrict_to_modalities"]
        if modalities is not None:
            modalities = list(validate_modalities(modalities, "restrict_to_modalities"))
            if not modalities:
                raise ValueError(f"Stage {stage['name']!r}: `restrict_to_modalities` must name a modality, or be None.")
        try:
            sources = {int(layer): int(expert) for layer, expert in stage["source_experts"].items()}
        except (AttributeError, TypeError, ValueError) as error:
            raise ValueError(
                f"Stage {stage['name']!r}: `source_experts` must map layer index -> expert index, got "
                f"{stage['source_experts']!r}."
            ) from error
        return {
            "name": stage["name"],
            "num_new_experts": count,
            "restrict_to_modalities": modalities,
            "source_experts": sources,
        }

    def stage_modalities(self) -> list[list[str] | None]:
        """The modalities each stage's new experts serve (None: every token), stage 0 first."""
        return [self.restrict_to_modalities, *(stage["restrict_to_modalities"] for stage in self.stages)]

    @staticmethod
    def _normalise_expert_init(value: str | int | dict) -> str | int | dict[int, int]:
        if isinstance(value, bool):
            raise ValueError(f"`expert_init` must be {EXPERT_INIT_MODES}, an int or a dict, got {value!r}.")
        if isinstance(value, int):
            if value < 0:
                raise ValueError(f"`expert_init` as an expert index must be >= 0, got {value}.")
            return value
        if isinstance(value, str):
            if value in DEPRECATED_EXPERT_INIT_MODES:
                renamed = DEPRECATED_EXPERT_INIT_MODES[value]
                warnings.warn(
                    f"`expert_init={value!r}` is deprecated and means `expert_init={renamed!r}`: new experts copy "
                    "expert 0 until `init_new_experts_from_data(batches)` measures each layer's most used expert. "
                    f"Write `expert_init={renamed!r}`.",
                    FutureWarning,
                    stacklevel=5,
                )
                return renamed
            if value not in EXPERT_INIT_MODES:
                raise ValueError(
                    f"`expert_init` must be one of {EXPERT_INIT_MODES}, an expert index or a "
                    f"{{layer_index: expert_index}} dict, got {value!r}."
                )
            return value
        if isinstance(value, dict):
            # JSON turns int keys into strings: accept both.
            try:
                return {int(layer): int(expert) for layer, expert in value.items()}
            except (TypeError, ValueError) as error:
                raise ValueError(f"`expert_init` dict must map layer index -> expert index, got {value!r}.") from error
        raise ValueError(f"`expert_init` must be {EXPERT_INIT_MODES}, an int or a dict, got {value!r}.")
