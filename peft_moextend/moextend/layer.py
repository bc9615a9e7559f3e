"""MoExtend tuner layer: wraps a transformers MoE block and adds experts, router rows and calibration.

Einstein notation: b - batch, s - sequence, t - tokens (b*s), h - hidden, i - expert intermediate size,
e - old experts, n - new experts, k - top-k slots.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..call_inputs import CallInputs
from ..experts import AddedExperts, FullExperts, LowRankExperts, added_experts_forward, kaiming_uniform_experts
from ..modality import MODALITIES, modality_index
from ..moe_families import MoEFamily, expert_weights, experts_are_transposed, hidden_size_of
from ..quantization import parameter_meta
from ..routing import RoutedLayer, RoutingRecord, dispatch_mask_from_top_k
from .config import MoExtendConfig
from .router import extended_routing


class MoExtendSettings(NamedTuple):
    """An adapter's per-layer settings (one record per adapter, `moextend_settings[adapter]`): its load-balancing
    coefficient and the modality ids `(m,)` its new experts serve (None: every token)."""

    aux_loss_coef: float
    modalities: torch.Tensor | None

    @classmethod
    def of(cls, config: MoExtendConfig) -> MoExtendSettings:
        allowed = config.restrict_to_modalities
        ids = None if allowed is None else torch.tensor([modality_index(m) for m in allowed])
        return cls(config.router_aux_loss_coef, ids)


class MoExtendLayer(nn.Module, BaseTunerLayer, RoutedLayer):
    """An MoE block (`base_layer`, frozen) plus, per adapter, `n` new experts with their router rows.

    Added parameters (all trainable, all prefixed `moextend_`), per adapter:
    - full new experts (`new_expert_rank=None`): `moextend_gate_up_proj` `(n, 2i, h)` (`(n, h, 2i)` for transposed
      layouts such as Llama 4) and `moextend_down_proj` `(n, h, i)` (`(n, i, h)`);
    - low-rank new experts (`new_expert_rank=r`): deltas on the shared source expert `moextend_source_expert`,
      `moextend_gate_up_A` `(n, r, h)`, `moextend_gate_up_B` `(n, 2i, r)`, `moextend_down_A` `(n, r, i)`,
      `moextend_down_B` `(n, h, r)` (B zero-initialised);
    - `moextend_router` `(n, h)` and the optional calibration MLP `moextend_calibration_in` `(d, e+n)`,
      `moextend_calibration_out` `(e+n, d)`.
    Every added tensor sits directly in a per-adapter container, so saved keys are `<module>.<container>`.
    An adapter with `router_aux_loss_layers="all"` also wraps the MoE blocks it does not extend, adding no tensor
    there (`update_observer`): the block computes exactly as before and its routing counts in the adapter's aux loss.
    """

    adapter_layer_names = (
        "moextend_gate_up_proj",
        "moextend_down_proj",
        "moextend_gate_up_A",
        "moextend_gate_up_B",
        "moextend_down_A",
        "moextend_down_B",
        "moextend_router",
        "moextend_calibration_in",
        "moextend_calibration_out",
    )
    other_param_names = ("moextend_settings", "moextend_source_expert")

    def __init__(self, base_layer: nn.Module, family: MoEFamily, layer_index: int, call_inputs: CallInputs) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.family = family
        self.layer_index = layer_index
        self.call_inputs = call_inputs
        for name in self.adapter_layer_names:
            setattr(self, name, nn.ParameterDict())
        self.moextend_settings: dict[str, MoExtendSettings] = {}
        self.moextend_source_expert: dict[str, int] = {}  # low-rank adapters: the expert their deltas apply to
        self.routing_records: dict[str, RoutingRecord] = {}
        self._disable_adapters = False
        self.merged_adapters = []

    @property
    def num_base_experts(self) -> int:
        return self.family.num_experts(self.base_layer)

    def update_layer(self, adapter_name: str, config: MoExtendConfig, source_expert: int) -> None:
        """Create adapter `adapter_name`: `config.num_new_experts` new experts starting as copies of expert
        `source_expert` (full copies, or low-rank deltas on it), with its router row."""
        num_new, num_base = config.num_new_experts, self.num_base_experts
        if not 0 <= source_expert < num_base:
            raise ValueError(
                f"`expert_init` asks to copy expert {source_expert} in layer {self.layer_index}, which has "
                f"{num_base} experts (valid indices 0..{num_base - 1})."
            )
        router_row, gate_up, down = self._source_weights(source_expert, zero_down_proj=config.expert_init == "zeros")
        self.moextend_router[adapter_name] = nn.Parameter(router_row.repeat(num_new, 1))
        if config.new_expert_rank is None:
            self.moextend_gate_up_proj[adapter_name] = nn.Parameter(gate_up.repeat(num_new, 1, 1))
            self.moextend_down_proj[adapter_name] = nn.Parameter(down.repeat(num_new, 1, 1))
        else:
            self._create_low_rank_deltas(adapter_name, num_new, config.new_expert_rank)
            self.moextend_source_expert[adapter_name] = source_expert
        if config.calibration:
            # nn.Linear's default init for the first layer; zeros for the last (identity correction at start)
            calibration_in = nn.Linear(num_base + num_new, config.calibration_hidden_size, bias=False).weight.detach()
            self.moextend_calibration_in[adapter_name] = nn.Parameter(calibration_in)
            self.moextend_calibration_out[adapter_name] = nn.Parameter(
                torch.zeros(num_base + num_new, config.calibration_hidden_size)
            )
        self.moextend_settings[adapter_name] = MoExtendSettings.of(config)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    def update_observer(self, adapter_name: str, config: MoExtendConfig) -> None:
        """Register adapter `adapter_name` on a block it does not extend: no tensor is added, the block computes as
        the base does, and its routing is recorded for the adapter's load-balancing loss."""
        self.moextend_settings[adapter_name] = MoExtendSettings.of(config)
        self.set_adapter(self.active_adapters)

    def extends(self, adapter_name: str) -> bool:
        """Whether `adapter_name` adds experts to this block (False where it only records the block's routing)."""
        return adapter_name in self.moextend_router

    def _create_low_rank_deltas(self, adapter_name: str, num_new: int, rank: int) -> None:
        experts = self.base_layer.experts
        hidden = hidden_size_of(experts)
        intermediate = parameter_meta(experts, "down_proj")[0][1 if experts_are_transposed(experts) else 2]
        for prefix, (in_features, out_features) in {
            "gate_up": (hidden, 2 * intermediate),
            "down": (intermediate, hidden),
        }.items():
            weight_a = kaiming_uniform_experts(num_new, rank, in_features).view(num_new, rank, in_features)
            getattr(self, f"moextend_{prefix}_A")[adapter_name] = nn.Parameter(weight_a)
            getattr(self, f"moextend_{prefix}_B")[adapter_name] = nn.Parameter(torch.zeros(num_new, out_features, rank))

    def is_low_rank(self, adapter_name: str) -> bool:
        return adapter_name in self.moextend_gate_up_A

    def _source_weights(self, source_expert: int, zero_down_proj: bool) -> tuple[torch.Tensor, ...]:
        """Copies of expert `source_expert`'s router row `(h,)`, gate/up `(2i, h)` and down `(h, i)` weights (base
        layout; the expert alone is dequantized from a 4-bit base)."""
        with torch.no_grad():
            router_row = self.family.router(self.base_layer).weight[source_expert].detach().clone()
            gate_up, down = (w.detach().clone() for w in expert_weights(self.base_layer.experts, source_expert))
        return router_row, gate_up, torch.zeros_like(down) if zero_down_proj else down

    def copy_expert_into_new(self, adapter_name: str, source_expert: int, zero_down_proj: bool) -> None:
        """Re-initialise, in place, the new experts and router rows of `adapter_name` from expert `source_expert`:
        full experts copy its weights (the down projection zeroed with `zero_down_proj`); low-rank ones take it as
        their source and restart from a zero delta."""
        router_row, gate_up, down = self._source_weights(source_expert, zero_down_proj)
        with torch.no_grad():
            self.moextend_router[adapter_name].copy_(router_row.unsqueeze(0))
            if self.is_low_rank(adapter_name):
                self.moextend_source_expert[adapter_name] = source_expert
                self.moextend_gate_up_B[adapter_name].zero_()
                self.moextend_down_B[adapter_name].zero_()
            else:
                self.moextend_gate_up_proj[adapter_name].copy_(gate_up.unsqueeze(0))
                self.moextend_down_proj[adapter_name].copy_(down.unsqueeze(0))

    def added_experts(self, adapter_name: str) -> AddedExperts:
        """The new experts of `adapter_name`, ready for `added_experts_forward`."""
        transposed = experts_are_transposed(self.base_layer.experts)
        if not self.is_low_rank(adapter_name):
            return FullExperts(
                self.moextend_gate_up_proj[adapter_name], self.moextend_down_proj[adapter_name], transposed
            )
        source_gate_up, source_down = expert_weights(self.base_layer.experts, self.moextend_source_expert[adapter_name])
        return LowRankExperts(
            source_gate_up,
            source_down,
            self.moextend_gate_up_A[adapter_name],
            self.moextend_gate_up_B[adapter_name],
            self.moextend_down_A[adapter_name],
            self.moextend_down_B[adapter_name],
            transposed,
        )

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: torch.device | None = None) -> None:
        """An MoE block has no `weight`: follow its experts' device and (floating) dtype, as PEFT's LoRA follows its
        base weight (a 4-bit expert tensor counts with the dtype it computes in); PEFT's
        `autocast_adapter_dtype=True` then upcasts float16/bfloat16 to float32."""
        _, experts_dtype, experts_device = parameter_meta(self.base_layer.experts, "gate_up_proj")
        target = device if device is not None else experts_device
        dtype = experts_dtype if experts_dtype.is_floating_point else None
        for name in self.adapter_layer_names:
            container = getattr(self, name)
            if adapter_name in container and container[adapter_name].device.type != "meta":
                container[adapter_name] = nn.Parameter(
                    container[adapter_name].to(target, dtype=dtype), requires_grad=container[adapter_name].requires_grad
                )

    def _eligible_tokens(self, adapter_name: str, num_tokens: int, device: torch.device) -> torch.Tensor | None:
        """`(t,)` bool: tokens allowed to use the new experts; None means all tokens."""
        allowed = self.moextend_settings[adapter_name].modalities
        if allowed is None:
            return None
        needed = [MODALITIES[i] for i in allowed.tolist()]
        modality_ids = self.call_inputs.layer_modality_ids(
            num_tokens, None, needed, device, "MoExtend (`restrict_to_modalities`)"
        )
        return torch.isin(modality_ids, allowed.to(device))

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        """hidden_states: `(b, s, h)`; returns what the base block returns (Llama 4: `(out, router_logits)`)."""
        if self.disable_adapters or self.merged:
            return self.base_layer(hidden_states, *args, **kwargs)
        active = [a for a in self.active_adapters if a in self.moextend_settings]
        if not active:
            return self.base_layer(hidden_states, *args, **kwargs)
        if len(active) > 1:
            raise ValueError(
                f"MoExtend routes over one set of new experts at a time, but adapters {active} are active; "
                "call `model.set_adapter(name)` with a single adapter."
            )
        adapter = active[0]
        input_shape = hidden_states.shape
        eligible = self._eligible_tokens(adapter, input_shape[:-1].numel(), hidden_states.device)  # (t,) or None
        if eligible is not None and not bool(eligible.any()):
            self.routing_records.pop(adapter, None)
            return self.base_layer(hidden_states, *args, **kwargs)
        if not self.extends(adapter):
            return self._observed_forward(adapter, eligible, hidden_states, *args, **kwargs)

        block, family = self.base_layer, self.family
        # the base block's own router jitter (training only): old and new router rows and all experts see it
        hidden = family.jitter(block, hidden_states).reshape(-1, input_shape[-1])  # (t, h)
        base_logits, base_weights, base_index = family.route(block, hidden)  # (t, e), (t, k), (t, k)
        calibration = (
            (self.moextend_calibration_in[adapter], self.moextend_calibration_out[adapter])
            if adapter in self.moextend_calibration_in
            else None
        )
        router_weight = self.moextend_router[adapter]
        new_logits = F.linear(hidden.to(router_weight.dtype), router_weight)  # (t, n)
        logits, top_k_index, top_k_weights = extended_routing(
            family, base_logits, new_logits, base_index.shape[-1], family.renormalize(block), calibration
        )
        top_k_weights = top_k_weights.to(base_weights.dtype)
        if eligible is not None:
            # Ineligible tokens keep the base router's exact choice and weights.
            top_k_index = torch.where(eligible[:, None], top_k_index, base_index)
            top_k_weights = torch.where(eligible[:, None], top_k_weights, base_weights)
        self._record_routing(adapter, logits, top_k_index, eligible)

        num_base = self.num_base_experts
        is_base_slot = top_k_index < num_base
        # Slots routed to new experts reach the base kernel as expert 0 with weight 0: never an index >= e.
        routed = family.routed_experts(
            block,
            hidden,
            torch.where(is_base_slot, top_k_index, torch.zeros_like(top_k_index)),
            torch.where(is_base_slot, top_k_weights, torch.zeros_like(top_k_weights)),
        )
        experts = block.experts
        routed = routed + added_experts_forward(
            hidden,
            top_k_index,
            top_k_weights,
            num_base,
            self.added_experts(adapter),
            getattr(experts, "_apply_gate", None) or _default_gate(experts.act_fn),
            weights_scale_input=family.weights_scale_input,
        )
        out = family.add_shared_expert(block, hidden, routed).reshape(input_shape)
        if family.weights_scale_input:
            return out, base_logits
        return out

    def _observed_forward(
        self, adapter: str, eligible: torch.Tensor | None, hidden_states: torch.Tensor, *args, **kwargs
    ):
        """The base block's own forward, unchanged, with its routing recorded for `adapter`'s load-balancing loss
        (`router_aux_loss_layers="all"` on a block the adapter does not extend). The router's output is read by a
        hook that lives for this call only."""
        block, family = self.base_layer, self.family
        router_outputs = []
        handle = family.router(block).register_forward_hook(lambda module, args, output: router_outputs.append(output))
        try:
            out = block(hidden_states, *args, **kwargs)
        finally:
            handle.remove()
        logits, _, top_k_index = family.read_router_output(block, router_outputs[-1])  # (t, e), _, (t, k)
        self._record_routing(adapter, logits, top_k_index, eligible)
        return out

    def _record_routing(
        self, adapter: str, logits: torch.Tensor, top_k_index: torch.Tensor, eligible: torch.Tensor | None
    ) -> None:
        """Record the call's routing (logits `(t, e)`, chosen `(t, k)`) for `adapter`'s load-balancing loss, over the
        non-padding tokens that may use the new experts."""
        token_mask = self.call_inputs.token_attention_mask(logits.shape[0])
        if eligible is not None:
            token_mask = eligible if token_mask is None else token_mask & eligible
        self.routing_records[adapter] = RoutingRecord(
            F.softmax(logits.float(), dim=-1),
            dispatch_mask_from_top_k(top_k_index, logits.shape[-1]),
            token_mask,
            self.moextend_settings[adapter].aux_loss_coef,
        )

    def __repr__(self) -> str:
        return "moextend." + super().__repr__()


def _default_gate(act_fn):
    """`act(gate) * up` on a `(..., 2i)` projection, for experts classes without `_apply_gate`."""

    def apply_gate(gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return act_fn(gate) * up

    return apply_gate
