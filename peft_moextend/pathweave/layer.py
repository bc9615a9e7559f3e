"""PathWeave tuner layer: uni-modal adapters added modality by modality, with adapter-in-adapters and gates.

Einstein notation: t - tokens, i - in features, o - out features, r - rank, a - adapters (modalities so far).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..call_inputs import CallInputs
from ..experts import kaiming_uniform_experts
from ..modality import MODALITIES, modality_index
from ..registration import METHODS, ExpertPeftType
from ..tuner_utils import LinearExpertLayer, StagedParameters, as_dtype
from .config import PathWeaveConfig
from .gate import noisy_top_k_gates

_KINDS = ("down", "up", "scale", "inadapter", "inadapter_bias", "gate", "noise")


class PathWeaveSettings(NamedTuple):
    """An adapter's gate and in-adapter settings (see `PathWeaveConfig`)."""

    noisy_gate: bool
    gate_top_k: int | None
    in_adapter_form: str


class PathWeaveLayer(LinearExpertLayer, StagedParameters):
    """A linear `base_layer` plus, per adapter and modality stage k (the k-th modality added):

    `pathweave_down_k` `(r, i)`, `pathweave_up_k` `(o, r)` (zero), `pathweave_scale_k` `(1,)` (one) — the uni-modal
    adapter; for k > 0 also `pathweave_inadapter_k` `(k, r, r)` — the in-adapters of the k older adapters for this
    modality (zero in the residual form; `pathweave_inadapter_bias_k` `(k, r)` too in the replace form) —,
    `pathweave_gate_k` `(k+1, i)` (zero) — the gate over all k+1 adapters — and, with the noisy gate,
    `pathweave_noise_k` `(k+1, i)` (zero). Tokens of modality k get `sum_j g_j * s_j * up_j(m_kj(h_j))` with
    `h_j = down_j x`, `m_kj(h) = h + W_kj h` (residual) or `W_kj h + b_kj` (replace) for j < k, `m_kk(h) = h`;
    text tokens get nothing.
    """

    method_name = METHODS[ExpertPeftType.PATHWEAVE].name
    stage_prefix = METHODS[ExpertPeftType.PATHWEAVE].prefix

    def __init__(self, base_layer: nn.Module, module_name: str, call_inputs: CallInputs) -> None:
        super().__init__(base_layer, module_name, call_inputs)
        self.train(base_layer.training)  # a model wrapped in eval mode keeps its deterministic (noise-free) gate
        self.init_stages()
        self.other_param_names: tuple[str, ...] = ("pathweave_modalities", "pathweave_settings")
        self.pathweave_modalities: dict[str, list[str]] = {}
        self.pathweave_settings: dict[str, PathWeaveSettings] = {}

    def add_modality(self, adapter_name: str, modality: str, config: PathWeaveConfig) -> None:
        """Stage k = the next modality: freeze stages < k, add its adapter, in-adapters and gate."""
        modalities = self.pathweave_modalities.setdefault(adapter_name, [])
        self.pathweave_settings[adapter_name] = PathWeaveSettings(
            config.noisy_gate, config.gate_top_k, config.in_adapter_form
        )
        stage, r = len(modalities), config.r
        self.add_stage("down", stage)[adapter_name] = nn.Parameter(kaiming_uniform_experts(1, r, self.in_features))
        self.add_stage("up", stage)[adapter_name] = nn.Parameter(torch.zeros(self.out_features, r))
        self.add_stage("scale", stage)[adapter_name] = nn.Parameter(torch.ones(1))
        if stage:
            if config.in_adapter_form == "replace":  # nn.Linear(r, r)'s default init, one per older adapter
                weight = kaiming_uniform_experts(stage, r, r).reshape(stage, r, r)
                bias = torch.empty(stage, r).uniform_(-(r**-0.5), r**-0.5)
                self.add_stage("inadapter_bias", stage)[adapter_name] = nn.Parameter(bias)
            else:
                weight = torch.zeros(stage, r, r)
            self.add_stage("inadapter", stage)[adapter_name] = nn.Parameter(weight)
            self.add_stage("gate", stage)[adapter_name] = nn.Parameter(torch.zeros(stage + 1, self.in_features))
            if config.noisy_gate:
                self.add_stage("noise", stage)[adapter_name] = nn.Parameter(torch.zeros(stage + 1, self.in_features))
        modalities.append(modality)
        self.place_adapter(adapter_name)
        self.freeze_before(adapter_name, stage, _KINDS)
        self.set_adapter(self.active_adapters)

    def _stage_delta(self, adapter: str, stage: int, x: torch.Tensor) -> torch.Tensor:
        """`(t, o)` output of modality stage `stage` for its tokens `x` `(t, i)`."""
        if not stage:  # the first stage is a plain low-rank adapter: two matmuls, nothing stacked
            down, up = self.stage("down", 0, adapter), self.stage("up", 0, adapter)
            x = self._cast_input_dtype(x, down.dtype)
            return F.linear(F.linear(x, down), up) * self.stage("scale", 0, adapter)
        settings = self.pathweave_settings[adapter]
        downs = torch.stack(self.stages("down", stage + 1, adapter))  # (a, r, i)
        ups = torch.stack(self.stages("up", stage + 1, adapter))  # (a, o, r)
        scales = torch.cat(self.stages("scale", stage + 1, adapter))  # (a,)
        x = self._cast_input_dtype(x, downs.dtype)
        hidden = torch.einsum("ti,ari->tar", x, downs)  # (t, a, r)
        inadapters = self.stage("inadapter", stage, adapter)  # (a-1, r, r)
        old = hidden[:, :stage]
        mapped = torch.einsum("tar,aqr->taq", old, inadapters)
        if settings.in_adapter_form == "replace":
            mapped = mapped + self.stage("inadapter_bias", stage, adapter)
        else:
            mapped = old + mapped
        hidden = torch.cat([mapped, hidden[:, stage:]], dim=1)
        out = torch.einsum("tar,aor->tao", hidden, ups) * scales[None, :, None]  # (t, a, o)
        noise = self.stage("noise", stage, adapter) if settings.noisy_gate else None
        gate = self.stage("gate", stage, adapter)
        gates = noisy_top_k_gates(x, gate, noise, settings.gate_top_k, self.training)  # (t, a)
        return (gates.unsqueeze(-1) * out).sum(1)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """x: `(..., i)`; returns `(..., o)`."""
        result = self.base_layer(x, *args, **kwargs)
        active = [a for a in self.active_adapters if self.pathweave_modalities.get(a)]
        if self.disable_adapters or self.merged or not active:
            return result
        tokens = x.reshape(-1, x.shape[-1])
        delta = None
        for adapter in active:
            modalities = self.pathweave_modalities[adapter]
            # one modality for every token (every decoding step of generate): that stage alone, nothing to sort out
            uniform = self.call_inputs.uniform_modality(
                tokens.shape[0], self.tower_modality, frozenset(modalities).difference(("text",))
            )
            if uniform is not None:
                if MODALITIES[uniform] in modalities:
                    stage_delta = self._stage_delta(adapter, modalities.index(MODALITIES[uniform]), tokens)
                    stage_delta = as_dtype(stage_delta, torch.float32)
                    delta = stage_delta if delta is None else delta + stage_delta
                continue
            token_modality = self.modality_ids(tokens.shape[0], modalities, x.device)
            for stage, modality in enumerate(modalities):  # loop over modalities present
                rows = token_modality == modality_index(modality)
                if not bool(rows.any()):
                    continue
                if bool(rows.all()):  # a single-modality call: no gather/scatter
                    stage_delta = self._stage_delta(adapter, stage, tokens).float()
                    delta = stage_delta if delta is None else delta + stage_delta
                    continue
                if delta is None:
                    delta = torch.zeros(tokens.shape[0], self.out_features, dtype=torch.float32, device=x.device)
                delta[rows] += self._stage_delta(adapter, stage, tokens[rows])
        if delta is None:
            return result
        delta = delta.view(result.shape)
        return result + as_dtype(delta, result.dtype)

    def __repr__(self) -> str:
        return "pathweave." + super().__repr__()
