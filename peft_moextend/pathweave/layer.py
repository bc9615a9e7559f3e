"""PathWeave tuner layer: uni-modal adapters added modality by modality, with adapter-in-adapters and gates.

Einstein notation: t - tokens, i - in features, o - out features, r - rank, a - adapters (modalities so far).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..call_inputs import CallInputs
from ..experts import kaiming_uniform_experts
from ..modality import modality_index
from ..tuner_utils import LinearExpertLayer, stage_container
from .config import PathWeaveConfig

_KINDS = ("down", "up", "scale", "inadapter", "gate")


class PathWeaveLayer(LinearExpertLayer):
    """A linear `base_layer` plus, per adapter and modality stage k (the k-th modality added):

    `pathweave_down_k` `(r, i)`, `pathweave_up_k` `(o, r)` (zero), `pathweave_scale_k` `(1,)` (one) — the uni-modal
    adapter; for k > 0 also `pathweave_inadapter_k` `(k, r, r)` (zero) — the in-adapters of the k older adapters for
    this modality — and `pathweave_gate_k` `(k+1, i)` (zero) — the gate over all k+1 adapters. Tokens of modality k
    get `sum_j g_j * s_j * up_j(h_j + h_j W_kj^T)` with `h_j = down_j x`; text tokens get nothing.
    """

    method_name = "PathWeave"

    def __init__(self, base_layer: nn.Module, module_name: str, call_inputs: CallInputs) -> None:
        super().__init__(base_layer, module_name, call_inputs)
        self.adapter_layer_names: tuple[str, ...] = ()
        self.other_param_names: tuple[str, ...] = ("pathweave_modalities",)
        self.frozen_peft_weight_names: dict[str, tuple[str, ...]] = {}
        self.pathweave_modalities: dict[str, list[str]] = {}

    def _container(self, kind: str, stage: int) -> nn.ParameterDict:
        return stage_container(self, f"pathweave_{kind}_{stage}")

    def add_modality(self, adapter_name: str, modality: str, config: PathWeaveConfig) -> None:
        """Stage k = the next modality: freeze stages < k, add its adapter, in-adapters and gate."""
        modalities = self.pathweave_modalities.setdefault(adapter_name, [])
        stage = len(modalities)
        self._container("down", stage)[adapter_name] = nn.Parameter(
            kaiming_uniform_experts(1, config.r, self.in_features)
        )
        self._container("up", stage)[adapter_name] = nn.Parameter(torch.zeros(self.out_features, config.r))
        self._container("scale", stage)[adapter_name] = nn.Parameter(torch.ones(1))
        if stage:
            self._container("inadapter", stage)[adapter_name] = nn.Parameter(torch.zeros(stage, config.r, config.r))
            self._container("gate", stage)[adapter_name] = nn.Parameter(torch.zeros(stage + 1, self.in_features))
        modalities.append(modality)
        self.place_adapter(adapter_name)
        self.frozen_peft_weight_names[adapter_name] = tuple(
            f"pathweave_{kind}_{k}" for k in range(stage) for kind in _KINDS
        )
        self.set_adapter(self.active_adapters)

    def _stage_delta(self, adapter: str, stage: int, x: torch.Tensor) -> torch.Tensor:
        """`(t, o)` output of modality stage `stage` for its tokens `x` `(t, i)`."""
        if not stage:  # the first stage is a plain low-rank adapter: two matmuls, nothing stacked
            down, up = self.pathweave_down_0[adapter], self.pathweave_up_0[adapter]
            x = self._cast_input_dtype(x, down.dtype)
            return F.linear(F.linear(x, down), up) * self.pathweave_scale_0[adapter]
        downs = torch.stack([getattr(self, f"pathweave_down_{k}")[adapter] for k in range(stage + 1)])  # (a, r, i)
        ups = torch.stack([getattr(self, f"pathweave_up_{k}")[adapter] for k in range(stage + 1)])  # (a, o, r)
        scales = torch.cat([getattr(self, f"pathweave_scale_{k}")[adapter] for k in range(stage + 1)])  # (a,)
        x = self._cast_input_dtype(x, downs.dtype)
        hidden = torch.einsum("ti,ari->tar", x, downs)  # (t, a, r)
        if stage:
            inadapters = getattr(self, f"pathweave_inadapter_{stage}")[adapter]  # (a-1, r, r)
            old = hidden[:, :stage]
            hidden = torch.cat([old + torch.einsum("tar,aqr->taq", old, inadapters), hidden[:, stage:]], dim=1)
        out = torch.einsum("tar,aor->tao", hidden, ups) * scales[None, :, None]  # (t, a, o)
        if not stage:
            return out[:, 0]
        gates = torch.softmax(F.linear(x, getattr(self, f"pathweave_gate_{stage}")[adapter]), dim=-1)  # (t, a)
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
            token_modality = self.modality_ids(tokens.shape[0], modalities, x.device)
            for stage, modality in enumerate(modalities):  # loop over modalities present
                rows = token_modality == modality_index(modality)
                if not bool(rows.any()):
                    continue
                if bool(rows.all()):  # a single-modality call (every decoding step): no gather/scatter
                    stage_delta = self._stage_delta(adapter, stage, tokens).float()
                    delta = stage_delta if delta is None else delta + stage_delta
                    continue
                if delta is None:
                    delta = torch.zeros(tokens.shape[0], self.out_features, dtype=torch.float32, device=x.device)
                delta[rows] += self._stage_delta(adapter, stage, tokens[rows])
        if delta is None:
            return result
        return result + delta.reshape(*result.shape[:-1], -1).to(result.dtype)

    def __repr__(self) -> str:
        return "pathweave." + super().__repr__()
