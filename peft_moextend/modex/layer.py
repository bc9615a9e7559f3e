"""ModeX tuner layers: a serial modality-expert adapter after a linear layer, and an affine after a norm layer.

Einstein notation: t - tokens, o - features of the adapted output, b - bottleneck, e - experts.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..call_inputs import CallInputs
from ..experts import kaiming_uniform_experts
from ..modality import modality_index
from ..registration import METHODS, ExpertPeftType
from ..tuner_utils import LinearExpertLayer, as_dtype
from .config import ModeXConfig


class ModeXLayer(LinearExpertLayer):
    """Linear `base_layer` followed by `y + sum_e w_e(y) up_e(ReLU(down(y)))`.

    Added tensors (prefixed `modex_`): `modex_down[adapter]` `(b, o)`, `modex_up[adapter]` `(o, e*b)` — all experts'
    up-projections side by side, zero-initialised so the layer starts as the base layer — and the coordinator
    `modex_router[adapter]` `(e, o)` with `modex_router_bias[adapter]` `(e,)`, initialised as a default
    `nn.Linear(o, e)` (as the reference code): a zero router would give every expert the same weight, so the
    identical zero-initialised experts would receive identical updates forever and the coordinator no gradient.
    Experts a token's modality may not use get weight 0 (`routing="modality_masks"`). With `routing="paper"` a layer
    in a media tower holds a single expert, `modex_up[adapter]` `(o, b)`, and no coordinator:
    `y + up(ReLU(down(y)))`.
    """

    method_name = METHODS[ExpertPeftType.MODEX].name
    adapter_layer_names = ("modex_down", "modex_up", "modex_router", "modex_router_bias")
    other_param_names = ("modex_settings",)

    def __init__(self, base_layer: nn.Module, module_name: str, call_inputs: CallInputs) -> None:
        super().__init__(base_layer, module_name, call_inputs)
        self.modex_down = nn.ParameterDict()
        self.modex_up = nn.ParameterDict()
        self.modex_router = nn.ParameterDict()
        self.modex_router_bias = nn.ParameterDict()
        self.modex_settings: dict[str, _ExpertSettings] = {}

    def update_layer(self, adapter_name: str, config: ModeXConfig) -> None:
        # the reference code adapts its encoders' layers with single-expert adapters (`Adapter` in `vit.py` blocks)
        single_expert = config.routing == "paper" and self.tower_modality is not None
        num_experts = 1 if single_expert else len(config.experts)
        self.modex_down[adapter_name] = nn.Parameter(
            kaiming_uniform_experts(1, config.bottleneck_size, self.out_features)
        )
        self.modex_up[adapter_name] = nn.Parameter(torch.zeros(self.out_features, num_experts * config.bottleneck_size))
        if not single_expert:
            router = nn.Linear(self.out_features, num_experts)
            self.modex_router[adapter_name] = nn.Parameter(router.weight.detach())
            self.modex_router_bias[adapter_name] = nn.Parameter(router.bias.detach())
        self.modex_settings[adapter_name] = _ExpertSettings(config)
        self.place_adapter(adapter_name)
        self.set_adapter(self.active_adapters)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """x: `(..., i)`; returns `(..., o)`."""
        result = self.base_layer(x, *args, **kwargs)
        active = [a for a in self.active_adapters if a in self.modex_down]
        if self.disable_adapters or self.merged or not active:
            return result
        outputs = result.reshape(-1, result.shape[-1])  # (t, o)
        for adapter in active:
            down = self.modex_down[adapter]
            y = self._cast_input_dtype(outputs, down.dtype)
            hidden = F.relu(F.linear(y, down))  # (t, b)
            if adapter in self.modex_router:  # else a single expert
                settings = self.modex_settings[adapter]
                modality = self.inference_modality(
                    y.shape[0], settings.needed_modalities if settings.uses_masks else None
                )
                if modality is not None:
                    delta = self._inference_delta(adapter, settings, y, hidden, modality)
                    if delta is not None:
                        outputs = outputs + as_dtype(delta, outputs.dtype)
                    continue
                weights = self._coordinator_weights(adapter, y)  # (t, e)
                hidden = (weights.unsqueeze(-1) * hidden.unsqueeze(1)).flatten(1)  # (t, e*b)
            outputs = outputs + F.linear(hidden, self.modex_up[adapter]).to(outputs.dtype)
        return outputs.view(result.shape)

    def _inference_delta(
        self, adapter: str, settings: _ExpertSettings, y: torch.Tensor, hidden: torch.Tensor, modality: int
    ) -> torch.Tensor | None:
        """The experts' `(t, o)` delta for outputs `y` `(t, o)` and their bottleneck `hidden` `(t, b)`, when all
        tokens have modality id `modality` (-1: no masks), in eval without autograd; None when no expert may act on
        them. The experts the modality may not use are masked with one constant row, without per-token eligibility
        tensors; every tensor has the general path's shape and every value is computed as there, so the outputs
        are the same bit for bit."""
        logits = F.linear(y, self.modex_router[adapter], self.modex_router_bias[adapter]) / settings.temperature
        if modality >= 0:
            blocked = settings.blocked(modality, logits.device)
            if blocked.every:
                return None
            if blocked.some:
                logits = logits.masked_fill(blocked.row, float("-inf"))
        mixed = (torch.softmax(logits, dim=-1).unsqueeze(-1) * hidden.unsqueeze(1)).flatten(1)  # (t, e*b)
        return F.linear(mixed, self.modex_up[adapter])

    def _coordinator_weights(self, adapter: str, y: torch.Tensor) -> torch.Tensor:
        """`(t, e)` expert weights of the tokens `y` `(t, o)`: the coordinator's softmax, over the experts each token's
        modality may use with modality masks, over all experts with `routing="paper"`."""
        settings = self.modex_settings[adapter]
        logits = F.linear(y, self.modex_router[adapter], self.modex_router_bias[adapter]) / settings.temperature
        if settings.uses_masks:
            modalities = self.modality_ids(y.shape[0], settings.needed_modalities, y.device)
            logits = logits.masked_fill(~settings.eligible(modalities), float("-inf"))
        return torch.softmax(logits, dim=-1).nan_to_num(0.0)  # a token no expert may serve gets none

    def __repr__(self) -> str:
        return "modex." + super().__repr__()


class ModeXNormLayer(nn.Module, BaseTunerLayer):
    """A normalisation `base_layer` followed by a trainable per-channel affine `y * scale + shift`.

    Added tensors: `modex_norm_scale[adapter]` (ones) and `modex_norm_shift[adapter]` (zeros), `(features,)`: the
    same freedom as training the norm's own weight and bias, for any norm class, without touching it.
    """

    adapter_layer_names = ("modex_norm_scale", "modex_norm_shift")

    def __init__(self, base_layer: nn.Module, features: int) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.features = features
        self.in_features = self.out_features = features
        self.modex_norm_scale = nn.ParameterDict()
        self.modex_norm_shift = nn.ParameterDict()
        self._disable_adapters = False
        self.merged_adapters = []

    def update_layer(self, adapter_name: str, config: ModeXConfig) -> None:
        self.modex_norm_scale[adapter_name] = nn.Parameter(torch.ones(self.features))
        self.modex_norm_shift[adapter_name] = nn.Parameter(torch.zeros(self.features))
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters or self.merged:
            return result
        for adapter in self.active_adapters:
            if adapter in self.modex_norm_scale:
                scale, shift = self.modex_norm_scale[adapter], self.modex_norm_shift[adapter]
                affine = result * scale + shift
                result = as_dtype(affine, result.dtype)
        return result

    def __repr__(self) -> str:
        return "modex." + super().__repr__()


class _Blocked(NamedTuple):
    """The experts a modality may not use: `row` `(e,)` bool, and whether that is every expert / some expert."""

    row: torch.Tensor
    every: bool
    some: bool


class _ExpertSettings:
    """Per-adapter constants: the coordinator temperature and which modalities each expert serves (masks only with
    `routing="modality_masks"`)."""

    def __init__(self, config: ModeXConfig) -> None:
        self.temperature = config.router_temperature
        self.expert_modalities = [
            None if modalities is None else [modality_index(m) for m in modalities]
            for modalities in config.experts.values()
        ]
        self._blocked: dict[tuple[int, torch.device], _Blocked] = {}
        self.uses_masks = config.routing == "modality_masks" and any(m is not None for m in self.expert_modalities)
        # non-text modalities the model must be able to mark (placeholder ids or explicit modality_ids)
        self.needed_modalities = frozenset(
            m for modalities in config.experts.values() if modalities for m in modalities
        ).difference(("text",))

    def blocked(self, modality: int, device: torch.device) -> _Blocked:
        """The experts that may not act on tokens of modality id `modality` (made once per modality and device)."""
        key = (modality, device)
        if key not in self._blocked:
            flags = [allowed is not None and modality not in allowed for allowed in self.expert_modalities]
            self._blocked[key] = _Blocked(torch.tensor(flags, device=device), all(flags), any(flags))
        return self._blocked[key]

    def eligible(self, modalities: torch.Tensor) -> torch.Tensor:
        """`(t, e)` bool: expert e may act on token t."""
        columns = [
            torch.ones_like(modalities, dtype=torch.bool)
            if allowed is None
            else torch.isin(modalities, torch.tensor(allowed, device=modalities.device))
            for allowed in self.expert_modalities
        ]
        return torch.stack(columns, dim=-1)
