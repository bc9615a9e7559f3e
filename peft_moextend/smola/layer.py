"""SMoLA tuner layer: a linear base layer plus soft mixtures of low-rank experts, one mixture per modality group.

Einstein notation: t - tokens, i - in features, o - out features, e - experts (all groups), r - rank.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..call_inputs import CallInputs
from ..experts import gated_low_rank_mixture, kaiming_uniform_experts
from ..modality import MODALITIES, modality_index
from ..routing import RoutedLayer, RoutingRecord
from ..tuner_utils import LinearExpertLayer, as_dtype
from .config import MULTIMODAL, SMoLAConfig
from .router import route


class SMoLALayer(LinearExpertLayer, RoutedLayer):
    """A linear `base_layer` (frozen; nn.Linear or bitsandbytes 4/8-bit) plus, per adapter, `e` rank-`r` experts.

    Added parameters (prefixed `smola_`): `smola_A[adapter]` `(e*r, i)` — all experts' down projections stacked,
    `smola_B[adapter]` `(o, e*r)` — up projections, zero-initialised so the layer starts as the base layer, and
    `smola_router[adapter]` `(e, i)`. The mixture is one rank-`e*r` LoRA with the gates applied in between:
    `delta = scaling * B (gates (x) A x)`; tokens outside a group get gate 0 for its experts.
    """

    method_name = "SMoLA expert groups"
    adapter_layer_names = ("smola_A", "smola_B", "smola_router")
    other_param_names = ("smola_dropout", "smola_settings")

    def __init__(self, base_layer: nn.Module, module_name: str, call_inputs: CallInputs) -> None:
        super().__init__(base_layer, module_name, call_inputs)
        self.smola_A = nn.ParameterDict()
        self.smola_B = nn.ParameterDict()
        self.smola_router = nn.ParameterDict()
        self.smola_dropout = nn.ModuleDict()
        self.smola_settings: dict[str, _GroupSettings] = {}
        self.routing_records = {}

    def update_layer(self, adapter_name: str, config: SMoLAConfig) -> None:
        num_experts, rank = config.num_experts, config.r
        self.smola_A[adapter_name] = nn.Parameter(kaiming_uniform_experts(num_experts, rank, self.in_features))
        self.smola_B[adapter_name] = nn.Parameter(torch.zeros(self.out_features, num_experts * rank))
        self.smola_router[adapter_name] = nn.Parameter(torch.randn(num_experts, self.in_features) * 0.02)
        self.smola_dropout[adapter_name] = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.smola_settings[adapter_name] = _GroupSettings(config)
        self.place_adapter(adapter_name)
        self.set_adapter(self.active_adapters)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """x: `(..., i)`; returns `(..., o)`."""
        result = self.base_layer(x, *args, **kwargs)
        active = [a for a in self.active_adapters if a in self.smola_A]
        if self.disable_adapters or self.merged or not active:
            return result
        tokens = x.reshape(-1, x.shape[-1])  # (t, i)
        for adapter in active:
            settings = self.smola_settings[adapter]
            weight_a, weight_b, router = self.smola_A[adapter], self.smola_B[adapter], self.smola_router[adapter]
            if settings.top_k is None:  # the soft router keeps no routing record: eval may take the fast path
                modality = self.inference_modality(tokens.shape[0], settings.needed_modalities)
                if modality is not None:
                    delta = self._inference_delta(settings, weight_a, weight_b, router, x, modality)
                    if delta is not None:
                        result = result + as_dtype(delta, result.dtype)
                    continue
            inputs = self._cast_input_dtype(tokens, weight_a.dtype)
            logits = F.linear(inputs, router) / settings.temperature  # (t, e)
            gates, dispatch, probabilities = route(
                logits, settings.expert_group_on(x.device), settings.num_groups, settings.top_k, settings.group_sizes
            )
            if settings.needed_modalities is not None:
                modalities = self.modality_ids(tokens.shape[0], settings.needed_modalities, x.device)
                eligible = settings.eligible(modalities)  # (t, e)
                gates, probabilities = gates * eligible, probabilities * eligible
                dispatch = None if dispatch is None else dispatch & eligible
            if dispatch is not None:  # the load-balancing loss takes the full softmax (a gradient also with top-1)
                self.routing_records[adapter] = RoutingRecord(
                    probabilities,
                    dispatch,
                    self.call_inputs.token_attention_mask(tokens.shape[0]),
                    settings.aux_loss_coef,
                )
            delta = gated_low_rank_mixture(
                self.smola_dropout[adapter](inputs), weight_a, weight_b, gates, settings.scaling
            )  # (t, o)
            result = result + delta.reshape(*x.shape[:-1], -1).to(result.dtype)
        return result

    def _inference_delta(
        self,
        settings: _GroupSettings,
        weight_a: torch.Tensor,
        weight_b: torch.Tensor,
        router: torch.Tensor,
        x: torch.Tensor,
        modality: int,
    ) -> torch.Tensor | None:
        """The soft mixture's `(..., o)` delta for tokens `x` `(..., i)` that all have modality id `modality` (-1:
        the adapter tells no modalities apart), in eval without autograd; None when no expert acts on them.

        When the groups serving `modality` are one block of experts (e.g. `{"text": 4, "image": 4}`), only that
        block runs, on views of the weights: the skipped experts' gates are 0, so the result is the general path's
        up to float rounding (the up projection sums over fewer terms). Otherwise every tensor has the general
        path's shape, the other groups get gate 0 without a softmax or an eligibility lookup, and the result is
        the general path's bit for bit."""
        layout = settings.layout(modality)
        if layout is None:
            return None
        rank = settings.rank
        if layout.block is not None:  # views: no copy
            first, end = layout.block
            weight_a, router = weight_a[first * rank : end * rank], router[first:end]
            weight_b = weight_b[:, first * rank : end * rank]
        inputs = self._cast_input_dtype(x, weight_a.dtype)
        logits = F.linear(inputs, router)  # (..., e)
        if settings.temperature != 1.0:
            logits = logits / settings.temperature
        if len(layout.served) == 1:
            gates = logits.softmax(dim=-1)
        else:
            zero = settings.zero(logits)
            gates = torch.cat(
                [
                    part.softmax(dim=-1) if serves else zero.expand(part.shape)
                    for part, serves in zip(logits.split(layout.group_sizes, dim=-1), layout.served)
                ],
                dim=-1,
            )  # (..., e)
        return gated_low_rank_mixture(inputs, weight_a, weight_b, gates, settings.scaling)

    def __repr__(self) -> str:
        return "smola." + super().__repr__()


class _ServedLayout(NamedTuple):
    """The experts acting on one modality: `block` `(first, end)` when they are one block of consecutive experts but
    not all (else None: all experts run, unserved groups gated 0), the sizes of the groups that run and whether
    each of them serves the modality."""

    block: tuple[int, int] | None
    group_sizes: list[int]
    served: tuple[bool, ...]


class _GroupSettings:
    """Per-adapter constants (all of them: one record per adapter, `smola_settings[adapter]`): the LoRA scaling, the
    router's settings, which group each expert belongs to and which modality each group serves."""

    def __init__(self, config: SMoLAConfig) -> None:
        groups = list(config.expert_groups)
        self.rank = config.r
        self.scaling = config.lora_alpha / config.r
        self.num_groups = len(groups)
        self.top_k = config.top_k if config.router == "top_k" else None
        self.temperature = config.router_temperature
        self.aux_loss_coef = config.router_aux_loss_coef if config.router == "top_k" else 0.0
        self.expert_group = torch.tensor([i for i, g in enumerate(groups) for _ in range(config.expert_groups[g])])
        self.group_sizes = [config.expert_groups[g] for g in groups]  # the experts of a group are contiguous
        # modality id served by each expert's group; -1 = every modality ("multimodal")
        self.expert_modality = torch.tensor(
            [-1 if g == MULTIMODAL else modality_index(g) for g in groups for _ in range(config.expert_groups[g])]
        )
        self.group_modality = [-1 if g == MULTIMODAL else modality_index(g) for g in groups]
        self._layouts: dict[int, _ServedLayout | None] = {}
        self._zero = torch.zeros(())
        every_modality = torch.arange(len(MODALITIES))[:, None]
        self._eligibility = (self.expert_modality[None, :] == every_modality) | (self.expert_modality[None, :] < 0)
        # non-text modalities the groups tell apart; None when every group is "multimodal" (no modality needed)
        self.needed_modalities = (
            frozenset(g for g in groups if g not in (MULTIMODAL, "text"))
            if any(g != MULTIMODAL for g in groups)
            else None
        )

    def layout(self, modality: int) -> _ServedLayout | None:
        """Which experts act on tokens of modality id `modality` (-1: every expert); None when none does."""
        if modality not in self._layouts:
            served = [modality < 0 or m < 0 or m == modality for m in self.group_modality]
            starts = [sum(self.group_sizes[:g]) for g in range(len(served))]
            indices = [g for g, serves in enumerate(served) if serves]
            layout = None
            if indices and all(served):
                layout = _ServedLayout(None, self.group_sizes, tuple(served))
            elif indices and indices == list(range(indices[0], indices[-1] + 1)):  # one block of groups
                block = (starts[indices[0]], starts[indices[-1]] + self.group_sizes[indices[-1]])
                layout = _ServedLayout(block, [self.group_sizes[g] for g in indices], (True,) * len(indices))
            elif indices:
                layout = _ServedLayout(None, self.group_sizes, tuple(served))
            self._layouts[modality] = layout
        return self._layouts[modality]

    def zero(self, like: torch.Tensor) -> torch.Tensor:
        """A 0-dim zero of `like`'s dtype and device (the gates of groups that serve no token), made once."""
        if self._zero.dtype != like.dtype or self._zero.device != like.device:
            self._zero = like.new_zeros(())
        return self._zero

    def expert_group_on(self, device: torch.device) -> torch.Tensor:
        """`(e,)` group index of each expert on `device` (moved once, not on every call)."""
        if self.expert_group.device != device:
            self.expert_group = self.expert_group.to(device)
        return self.expert_group

    def eligible(self, modalities: torch.Tensor) -> torch.Tensor:
        """`(t, e)` bool: expert e acts on token t (one lookup in the `(modalities, e)` table)."""
        if self._eligibility.device != modalities.device:
            self._eligibility = self._eligibility.to(modalities.device)
        return self._eligibility[modalities]
