"""Configuration of PathWeave: adapter-in-adapter modality extension."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ..config_utils import ExpertConfig, strict_options
from ..modality import validate_modalities
from ..registration import MoExtendPeftType


@strict_options
@dataclass
class PathWeaveConfig(ExpertConfig):
    """Configuration of [`PathWeaveModel`] (Yu et al., NeurIPS 2024; code: JiazuoYu/PathWeave).

    One uni-modal adapter per modality (rank `r`, parallel to each target projection, down kaiming, up zero,
    learnable output scale 1.0), added over time with `model.base_model.add_modality(name)`: earlier modalities'
    adapters freeze, the new modality gets its adapter, small cross-modal in-adapters `Linear(r, r)` are inserted in
    the bottleneck of every frozen adapter for the new modality's tokens, and a per-layer gate (dense softmax, zero
    initialised) mixes all adapters for those tokens. Text tokens keep the base model's computation.

    Args:
        r: Rank of every uni-modal adapter (8 in the paper).
        modalities: Modalities in the order they were added; `get_peft_model` creates the listed ones (default
            `["image"]`), `add_modality` appends. Saved with the adapter so that loading rebuilds every stage.
        target_modules: Linear layers that get adapters; None: the language model's attention and MLP projections.
    """

    method_name: ClassVar[str] = "PathWeave"

    r: int = field(default=8, metadata={"help": "Rank of every uni-modal adapter."})
    modalities: list[str] = field(default_factory=lambda: ["image"], metadata={"help": "Modalities, in order."})
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Layers that get adapters; None = the language model's projections."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = MoExtendPeftType.PATHWEAVE
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {self.r!r}.")
        self.modalities = list(validate_modalities(self.modalities, "modalities"))
        if not self.modalities:
            raise ValueError("`modalities` must name at least the first modality, e.g. ['image'].")
        if len(set(self.modalities)) != len(self.modalities):
            raise ValueError(f"`modalities` has duplicates: {self.modalities}.")
