"""Configuration of ModeX: modality-expert coordinated serial adapters."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ..config_utils import ExpertConfig, strict_options
from ..modality import validate_modalities
from ..registration import METHODS, ExpertPeftType

ROUTINGS = ("modality_masks", "paper")


@strict_options
@dataclass
class ModeXConfig(ExpertConfig):
    """Configuration of [`ModeXModel`] (Zhang et al., Sci. China Inf. Sci., "ModeX"; code: zhangy0822/ModeX).

    After every target linear layer (by default the outputs of attention and MLP, `o_proj` and `down_proj`) a serial
    adapter `y + sum_e w_e(y) * up_e(ReLU(down(y)))`: one shared down-projection to `bottleneck_size`, one
    zero-initialised up-projection per modality expert, and a coordinator `w(y) = softmax(router(y) / T)` over the
    experts that may act on the token (dense, per token, no auxiliary loss). Optionally the normalisation layers
    (LayerNorm / RMSNorm) get a trainable affine correction, as the paper trains LayerNorms.

    Args:
        bottleneck_size: Width of the shared down-projection (16 in the paper).
        experts: Expert name -> modalities whose tokens it acts on (None = every token). Default: a text expert, a
            visual expert (image tokens; add "video" for video models) and a cross-modal expert. Experts are laid
            out in the alphabetical order of their names.
        router_temperature: T of the coordinator's softmax (10 in the paper).
        routing: "modality_masks" (default): an expert acts only on tokens of its modalities, the coordinator mixes
            the experts allowed for each token. "paper": as the reference code (`MEC_adapter.forward`), every expert
            acts on every token (the expert modalities are not used) and adapters in a media tower (vision/audio
            encoder or its projector) are single-expert serial adapters without a coordinator (the reference's
            `Adapter`).
        target_modules: Linear layers followed by an adapter; None: the language model's `o_proj` and `down_proj`.
            Name vision-tower modules too to adapt the tower (its tokens count as its modality).
        train_layer_norms: Add a trainable per-channel scale and shift (init 1 and 0) after every normalisation
            layer of the adapted part of the model.
    """

    method_name: ClassVar[str] = METHODS[ExpertPeftType.MODEX].name

    bottleneck_size: int = field(default=16, metadata={"help": "Width of the shared down-projection."})
    experts: dict[str, list[str] | None] = field(
        default_factory=lambda: {"text": ["text"], "visual": ["image"], "cross_modal": None},
        metadata={"help": "Expert name -> modalities it acts on (None = all tokens)."},
    )
    router_temperature: float = field(default=10.0, metadata={"help": "Coordinator softmax temperature."})
    routing: str = field(
        default="modality_masks",
        metadata={
            "help": "'modality_masks' (experts act on their modalities' tokens) or 'paper' (every expert on every "
            "token, single-expert adapters in media towers, as the reference code)."
        },
    )
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Linear layers followed by an adapter; None = LM o_proj and down_proj."}
    )
    train_layer_norms: bool = field(default=True, metadata={"help": "Trainable affine after normalisation layers."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = ExpertPeftType.MODEX
        if (
            not isinstance(self.bottleneck_size, int)
            or isinstance(self.bottleneck_size, bool)
            or self.bottleneck_size < 1
        ):
            raise ValueError(f"`bottleneck_size` must be a positive integer, got {self.bottleneck_size!r}.")
        if not isinstance(self.experts, dict) or not self.experts:
            raise ValueError(f"`experts` must be a non-empty dict name -> modalities, got {self.experts!r}.")
        for name, modalities in self.experts.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"`experts` names must be non-empty strings, got {name!r}.")
            if modalities is not None:
                if not modalities:
                    raise ValueError(f"Expert {name!r} acts on no modality; give modalities or None (all tokens).")
                validate_modalities(modalities, f"experts[{name!r}]")
        # Experts are laid out in name order: adapter_config.json is written with sorted keys, so the layout must not
        # depend on the dict order.
        self.experts = dict(sorted(self.experts.items()))
        if not self.router_temperature >= 1e-3:
            raise ValueError(f"`router_temperature` must be >= 0.001, got {self.router_temperature!r}.")
        if self.routing not in ROUTINGS:
            raise ValueError(f"`routing` must be one of {ROUTINGS}, got {self.routing!r}.")
