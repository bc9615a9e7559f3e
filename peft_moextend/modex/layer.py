"""ModeX tuner layers: a serial modality-expert adapter after a linear layer, and an affine after a norm layer.

Einstein notation: t - tokens, o - features of the adapted output, b - bottleneck, e - experts.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..forward_context import ForwardContext
from ..modality import modality_index
from ..quantization import linear_features
from .config import ModeXConfig


class ModeXLayer(nn.Module, BaseTunerLayer):
    """Linear `base_layer` followed by `y + sum_e w_e(y) up_e(ReLU(down(y)))`.

    Added tensors (prefixed `modex_`): `modex_down[adapter]` `(b, o)`, `modex_up[adapter]` `(o, e*b)` — all experts'
    up-projections side by side, zero-initialised so the layer starts as the base layer — and `modex_router[adapter]`
    `(e, o)`. Experts a token's modality may not use get weight 0.
    """

    adapter_layer_names = ("modex_down", "modex_up", "modex_router")
    other_param_names = ("modex_settings",)

    def __init__(self, base_layer: nn.Module, module_name: str, tower_modality: str | None, context: ForwardContext):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = linear_features(base_layer, module_name, "ModeX")
        self.tower_modality = tower_modality
        self._context = context
        self.modex_down = nn.ParameterDict()
        self.modex_up = nn.ParameterDict()
        self.modex_router = nn.ParameterDict()
        self.modex_settings: dict[str, _ExpertSettings] = {}
        self._disable_adapters = False
        self.merged_adapters = []

    def update_layer(self, adapter_name: str, config: ModeXConfig) -> None:
        device = next(self.base_layer.parameters()).device
        down = torch.empty(config.bottleneck_size, self.out_features)
        nn.init.kaiming_uniform_(down, a=math.sqrt(5))
        self.modex_down[adapter_name] = nn.Parameter(down.to(device))
        self.modex_up[adapter_name] = nn.Parameter(
            torch.zeros(self.out_features, len(config.experts) * config.bottleneck_size, device=device)
        )
        self.modex_router[adapter_name] = nn.Parameter(
            torch.zeros(len(config.experts), self.out_features, device=device)
        )
        self.modex_settings[adapter_name] = _ExpertSettings(config)
        if self.tower_modality is None:
            self._context.required_modalities.update(self.modex_settings[adapter_name].needed_modalities)
        self.set_adapter(self.active_adapters)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """x: `(..., i)`; returns `(..., o)`."""
        result = self.base_layer(x, *args, **kwargs)
        active = [a for a in self.active_adapters if a in self.modex_down]
        if self.disable_adapters or self.merged or not active:
            return result
        outputs = result.reshape(-1, result.shape[-1])  # (t, o)
        for adapter in active:
            settings, down = self.modex_settings[adapter], self.modex_down[adapter]
            y = outputs.to(down.dtype)
            logits = F.linear(y, self.modex_router[adapter]) / settings.temperature  # (t, e)
            if settings.uses_masks:
                modalities = self._context.layer_modality_ids(y.shape[0], self.tower_modality, y.device, "ModeX")
                eligible = settings.eligible(modalities)
                logits = logits.masked_fill(~eligible, float("-inf"))
            weights = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # a token no expert may serve gets none
            hidden = F.relu(F.linear(y, down))  # (t, b)
            mixed = (weights.unsqueeze(-1) * hidden.unsqueeze(1)).flatten(1)  # (t, e*b)
            outputs = outputs + F.linear(mixed, self.modex_up[adapter]).to(outputs.dtype)
        return outputs.reshape(result.shape)

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
        self.modex_norm_scale = nn.ParameterDict()
        self.modex_norm_shift = nn.ParameterDict()
        self._disable_adapters = False
        self.merged_adapters = []

    def update_layer(self, adapter_name: str, config: ModeXConfig) -> None:
        device = next(self.base_layer.parameters()).device
        self.modex_norm_scale[adapter_name] = nn.Parameter(torch.ones(self.features, device=device))
        self.modex_norm_shift[adapter_name] = nn.Parameter(torch.zeros(self.features, device=device))
        self.set_adapter(self.active_adapters)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters or self.merged:
            return result
        for adapter in self.active_adapters:
            if adapter in self.modex_norm_scale:
                scale, shift = self.modex_norm_scale[adapter], self.modex_norm_shift[adapter]
                result = (result * scale + shift).to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "modex." + super().__repr__()


class _ExpertSettings:
    """Per-adapter constants: the coordinator temperature and which modalities each expert serves."""

    def __init__(self, config: ModeXConfig) -> None:
        self.temperature = config.router_temperature
        self.expert_modalities = [
            None if modalities is None else [modality_index(m) for m in modalities]
            for modalities in config.experts.values()
        ]
        self.uses_masks = any(m is not None for m in self.expert_modalities)
        # non-text modalities the model must be able to mark (placeholder ids or explicit modality_ids)
        self.needed_modalities = {m for modalities in config.experts.values() if modalities for m in modalities} - {
            "text"
        }

    def eligible(self, modalities: torch.Tensor) -> torch.Tensor:
        """`(t, e)` bool: expert e may act on token t."""
        columns = [
            torch.ones_like(modalities, dtype=torch.bool)
            if allowed is None
            else torch.isin(modalities, torch.tensor(allowed, device=modalities.device))
            for allowed in self.expert_modalities
        ]
        return torch.stack(columns, dim=-1)
