"""Configuration of PathWeave: adapter-in-adapter modality extension."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ..config_utils import ExpertConfig, strict_options
from ..modality import validate_modalities
from ..registration import METHODS, ExpertPeftType

IN_ADAPTER_FORMS = ("residual", "replace")


@strict_options
@dataclass
class PathWeaveConfig(ExpertConfig):
    """Configuration of [`PathWeaveModel`] (Yu et al., NeurIPS 2024; code: JiazuoYu/PathWeave).

    One uni-modal adapter per modality (rank `r`, parallel to each target projection, down kaiming, up zero,
    learnable output scale 1.0), added over time with `model.base_model.add_modality(name)`: earlier modalities'
    adapters freeze, the new modality gets its adapter, small cross-modal in-adapters `Linear(r, r)` are inserted in
    the bottleneck of every frozen adapter for the new modality's tokens, and a per-layer gate (zero initialised)
    mixes all adapters for those tokens. Text tokens keep the base model's computation.

    Args:
        r: Rank of every uni-modal adapter (8 in the paper).
        modalities: Modalities in the order they were added; `get_peft_model` creates the listed ones (default
            `["image"]`), `add_modality` appends. Saved with the adapter so that loading rebuilds every stage.
        target_modules: Linear layers that get adapters; None: the language model's attention and MLP projections.
        noisy_gate: The reference code's noisy gate: in training, every gate logit gets Gaussian noise of standard
            deviation `softplus(x W_noise) + 0.01` (`W_noise` zero initialised, trained); in eval the gate is the
            plain softmax. False: the plain softmax in training too (no `W_noise`).
        gate_top_k: Adapters each token keeps (the others get gate weight 0); None keeps all of them, as the
            reference code does (its top-k uses `k = number of adapters`).
        in_adapter_form: "residual" (default): `h + W h`, `W` zero initialised, no bias, so a new stage starts from
            the frozen adapters unchanged; "replace": the reference code's `W h + b` (`nn.Linear(r, r)` with bias and
            PyTorch's default initialisation) in place of the bottleneck.
    """

    method_name: ClassVar[str] = METHODS[ExpertPeftType.PATHWEAVE].name

    r: int = field(default=8, metadata={"help": "Rank of every uni-modal adapter."})
    modalities: list[str] = field(default_factory=lambda: ["image"], metadata={"help": "Modalities, in order."})
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Layers that get adapters; None = the language model's projections."}
    )
    noisy_gate: bool = field(
        default=True,
        metadata={"help": "Training adds softplus(x W_noise) + 0.01 scaled Gaussian noise to the gate logits."},
    )
    gate_top_k: int | None = field(
        default=None, metadata={"help": "Adapters each token keeps in the gate; None = all (the reference code)."}
    )
    in_adapter_form: str = field(
        default="residual",
        metadata={"help": "'residual': h + W h (zero init); 'replace': W h + b (the reference code's Linear(r, r))."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = ExpertPeftType.PATHWEAVE
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {self.r!r}.")
        self.modalities = list(validate_modalities(self.modalities, "modalities"))
        if not self.modalities:
            raise ValueError("`modalities` must name at least the first modality, e.g. ['image'].")
        if len(set(self.modalities)) != len(self.modalities):
            raise ValueError(f"`modalities` has duplicates: {self.modalities}.")
        if not isinstance(self.noisy_gate, bool):
            raise ValueError(f"`noisy_gate` must be True or False, got {self.noisy_gate!r}.")
        if self.gate_top_k is not None and (
            not isinstance(self.gate_top_k, int) or isinstance(self.gate_top_k, bool) or self.gate_top_k < 1
        ):
            raise ValueError(
                f"`gate_top_k` must be None (keep every adapter) or a positive integer, got {self.gate_top_k!r}."
            )
        if self.in_adapter_form not in IN_ADAPTER_FORMS:
            raise ValueError(f"`in_adapter_form` must be one of {IN_ADAPTER_FORMS}, got {self.in_adapter_form!r}.")
