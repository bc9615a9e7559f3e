"""MoExtend tuner layer: wraps a transformers MoE block and adds experts, router rows and calibration.

Einstein notation: b - batch, s - sequence, t - tokens (b*s), h - hidden, i - expert intermediate size,
e - old experts, n - new experts, k - top-k slots.
"""

from __future__ import annotations

from collections.abc import Callable
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
from ..tuner_utils import StagedParameters
from .config import MoExtendConfig
from .router import calibration_correction, extended_routing


class MoExtendSettings(NamedTuple):
    """An adapter's per-layer settings (one record per adapter, `moextend_settings[adapter]`): its load-balancing
    coefficient, per stage the modality ids its new experts serve (None: every token), the names of the modalities
    some stage is restricted to, and whether the last stage serves every token an earlier stage serves (always with
    one stage). Plain ints, no tensors: nothing to copy to the input's device on each call."""

    aux_loss_coef: float
    modalities: tuple[tuple[int, ...] | None, ...]
    restricted_modalities: tuple[str, ...]
    last_stage_serves_all: bool

    @classmethod
    def of(cls, config: MoExtendConfig) -> MoExtendSettings:
        stages = config.stage_modalities()
        ids = tuple(None if allowed is None else tuple(modality_index(m) for m in allowed) for allowed in stages)
        restricted = sorted({m for allowed in stages if allowed is not None for m in allowed}, key=MODALITIES.index)
        *earlier, last = stages
        serves_all = last is None or all(allowed is not None and set(allowed) <= set(last) for allowed in earlier)
        return cls(config.router_aux_loss_coef, ids, tuple(restricted), serves_all)


class MoExtendLayer(nn.Module, BaseTunerLayer, StagedParameters, RoutedLayer):
    """An MoE block (`base_layer`, frozen) plus, per adapter and stage, `n` new experts with their router rows.

    Added parameters (all prefixed `moextend_`), per adapter, for stage 0 (the adapter's own new experts):
    - full new experts (`new_expert_rank=None`): `moextend_gate_up_proj` `(n, 2i, h)` (`(n, h, 2i)` for transposed
      layouts such as Llama 4) and `moextend_down_proj` `(n, h, i)` (`(n, i, h)`);
    - low-rank new experts (`new_expert_rank=r`): deltas on the stage's frozen source expert
      (`moextend_source_expert`), `moextend_gate_up_A` `(n, r, h)`, `moextend_gate_up_B` `(n, 2i, r)`,
      `moextend_down_A` `(n, r, i)`, `moextend_down_B` `(n, h, r)` (B zero-initialised);
    - `moextend_router` `(n, h)` and the optional calibration MLP `moextend_calibration_in` `(d, e+n)`,
      `moextend_calibration_out` `(e+n, d)`.
    Each later stage k (`MoExtendModel.add_stage`) adds the same tensors in containers suffixed `_k`, its
    calibration over every expert up to it; the stages before it are frozen. Every added tensor sits directly in a
    per-adapter container, so saved keys are `<module>.<container>`.
    An adapter with `router_aux_loss_layers="all"` also wraps the MoE blocks it does not extend, adding no tensor
    there (`update_observer`): the block computes exactly as before and its routing counts in the adapter's aux loss.
    """

    stage_prefix = "moextend_"
    staged_kinds = (
        "gate_up_proj",
        "down_proj",
        "gate_up_A",
        "gate_up_B",
        "down_A",
        "down_B",
        "router",
        "calibration_in",
        "calibration_out",
    )
    other_param_names = ("moextend_settings", "moextend_source_expert")

    def __init__(self, base_layer: nn.Module, family: MoEFamily, layer_index: int, call_inputs: CallInputs) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.family = family
        self.layer_index = layer_index
        self.call_inputs = call_inputs
        self.init_stages()
        for kind in self.staged_kinds:  # stage 0's containers always exist (the keys of single-stage adapters)
            self.add_stage(kind, 0)
        self.moextend_settings: dict[str, MoExtendSettings] = {}
        self.moextend_source_expert: dict[str, list[int]] = {}  # low-rank: per stage, the expert its deltas apply to
        self.routing_records: dict[str, RoutingRecord] = {}
        self._disable_adapters = False
        self.merged_adapters = []

    def stage_name(self, kind: str, k: int) -> str:
        """Stage 0 keeps the container names of single-stage adapters (`moextend_router`); stage k adds `_k`."""
        return f"{self.stage_prefix}{kind}" if k == 0 else f"{self.stage_prefix}{kind}_{k}"

    @property
    def num_base_experts(self) -> int:
        return self.family.num_experts(self.base_layer)

    def num_stages(self, adapter_name: str) -> int:
        return len(self.moextend_settings[adapter_name].modalities)

    def stage_sizes(self, adapter_name: str) -> list[int]:
        """New experts of each stage of `adapter_name` in this block."""
        return [router.shape[0] for router in self.stages("router", self.num_stages(adapter_name), adapter_name)]

    def update_layer(self, adapter_name: str, config: MoExtendConfig, source_expert: int) -> None:
        """Create adapter `adapter_name`: `config.num_new_experts` new experts starting as copies of expert
        `source_expert` (full copies, or low-rank deltas on it), with its router row; then the later stages recorded
        in `config.stages` (an adapter being loaded)."""
        self.moextend_settings[adapter_name] = MoExtendSettings.of(config)
        self.moextend_source_expert[adapter_name] = []
        self.create_stage(adapter_name, 0, config, config.num_new_experts, source_expert)
        for k, stage in enumerate(config.stages, start=1):
            source = stage["source_experts"].get(self.layer_index, source_expert)
            self.create_stage(adapter_name, k, config, stage["num_new_experts"], source)

    def create_stage(self, adapter_name: str, k: int, config: MoExtendConfig, num_new: int, source_expert: int) -> None:
        """Add stage k of `adapter_name` (its settings already list it): `num_new` experts copying expert
        `source_expert`, their router rows and calibration; the stages before k are frozen."""
        num_base = self.num_base_experts
        if not 0 <= source_expert < num_base:
            raise ValueError(
                f"`expert_init` asks to copy expert {source_expert} in layer {self.layer_index}, which has "
                f"{num_base} experts (valid indices 0..{num_base - 1})."
            )
        router_row, gate_up, down = self._source_weights(source_expert, zero_down_proj=config.expert_init == "zeros")
        self.add_stage("router", k)[adapter_name] = nn.Parameter(router_row.repeat(num_new, 1))
        if config.new_expert_rank is None:
            self.add_stage("gate_up_proj", k)[adapter_name] = nn.Parameter(gate_up.repeat(num_new, 1, 1))
            self.add_stage("down_proj", k)[adapter_name] = nn.Parameter(down.repeat(num_new, 1, 1))
        else:
            self._create_low_rank_deltas(adapter_name, k, num_new, config.new_expert_rank)
            self.moextend_source_expert[adapter_name].append(source_expert)
        if config.calibration:
            # over every expert up to this stage; nn.Linear's default init for the first layer, zeros for the last
            # (identity correction at start)
            experts = num_base + sum(self.stage_sizes(adapter_name)[: k + 1])
            calibration_in = nn.Linear(experts, config.calibration_hidden_size, bias=False).weight.detach()
            self.add_stage("calibration_in", k)[adapter_name] = nn.Parameter(calibration_in)
            self.add_stage("calibration_out", k)[adapter_name] = nn.Parameter(
                torch.zeros(experts, config.calibration_hidden_size)
            )
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.freeze_before(adapter_name, k, self.staged_kinds)
        self.set_adapter(self.active_adapters)

    def update_observer(self, adapter_name: str, config: MoExtendConfig) -> None:
        """Register adapter `adapter_name` on a block it does not extend: no tensor is added, the block computes as
        the base does, and its routing is recorded for the adapter's load-balancing loss."""
        self.moextend_settings[adapter_name] = MoExtendSettings.of(config)
        self.set_adapter(self.active_adapters)

    def extends(self, adapter_name: str) -> bool:
        """Whether `adapter_name` adds experts to this block (False where it only records the block's routing)."""
        return adapter_name in self.moextend_router

    def _create_low_rank_deltas(self, adapter_name: str, k: int, num_new: int, rank: int) -> None:
        experts = self.base_layer.experts
        hidden = hidden_size_of(experts)
        intermediate = parameter_meta(experts, "down_proj")[0][1 if experts_are_transposed(experts) else 2]
        for prefix, (in_features, out_features) in {
            "gate_up": (hidden, 2 * intermediate),
            "down": (intermediate, hidden),
        }.items():
            weight_a = kaiming_uniform_experts(num_new, rank, in_features).view(num_new, rank, in_features)
            self.add_stage(f"{prefix}_A", k)[adapter_name] = nn.Parameter(weight_a)
            self.add_stage(f"{prefix}_B", k)[adapter_name] = nn.Parameter(torch.zeros(num_new, out_features, rank))

    def is_low_rank(self, adapter_name: str) -> bool:
        return adapter_name in self.moextend_gate_up_A

    def _source_weights(self, source_expert: int, zero_down_proj: bool) -> tuple[torch.Tensor, ...]:
        """Copies of expert `source_expert`'s router row `(h,)`, gate/up `(2i, h)` and down `(h, i)` weights (base
        layout; the expert alone is dequantized from a 4-bit base)."""
        with torch.no_grad():
            router_row = self.family.router(self.base_layer).weight[source_expert].detach().clone()
            gate_up, down = (w.detach().clone() for w in expert_weights(self.base_layer.experts, source_expert))
        return router_row, gate_up, torch.zeros_like(down) if zero_down_proj else down

    def copy_expert_into_new(self, adapter_name: str, source_expert: int, zero_down_proj: bool, k: int = 0) -> None:
        """Re-initialise, in place, stage k's new experts and router rows of `adapter_name` from expert
        `source_expert`: full experts copy its weights (the down projection zeroed with `zero_down_proj`); low-rank
        ones take it as their source and restart from a zero delta."""
        router_row, gate_up, down = self._source_weights(source_expert, zero_down_proj)
        with torch.no_grad():
            self.stage("router", k, adapter_name).copy_(router_row.unsqueeze(0))
            if self.is_low_rank(adapter_name):
                self.moextend_source_expert[adapter_name][k] = source_expert
                self.stage("gate_up_B", k, adapter_name).zero_()
                self.stage("down_B", k, adapter_name).zero_()
            else:
                self.stage("gate_up_proj", k, adapter_name).copy_(gate_up.unsqueeze(0))
                self.stage("down_proj", k, adapter_name).copy_(down.unsqueeze(0))

    def added_experts(self, adapter_name: str, k: int = 0) -> AddedExperts:
        """Stage k's new experts of `adapter_name`, ready for `added_experts_forward`."""
        transposed = experts_are_transposed(self.base_layer.experts)
        if not self.is_low_rank(adapter_name):
            return FullExperts(
                self.stage("gate_up_proj", k, adapter_name), self.stage("down_proj", k, adapter_name), transposed
            )
        source_gate_up, source_down = expert_weights(
            self.base_layer.experts, self.moextend_source_expert[adapter_name][k]
        )
        return LowRankExperts(
            source_gate_up,
            source_down,
            *(self.stage(kind, k, adapter_name) for kind in ("gate_up_A", "gate_up_B", "down_A", "down_B")),
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

    def _stage_eligibility(self, adapter_name: str, num_tokens: int, device: torch.device) -> list[torch.Tensor | None]:
        """Per stage, `(t,)` bool: the tokens allowed to use its new experts; None means all tokens."""
        settings = self.moextend_settings[adapter_name]
        if not settings.restricted_modalities:
            return [None] * len(settings.modalities)
        modality_ids = self.call_inputs.layer_modality_ids(
            num_tokens, None, list(settings.restricted_modalities), device, "MoExtend (`restrict_to_modalities`)"
        )
        return [None if allowed is None else _any_equal(modality_ids, allowed) for allowed in settings.modalities]

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
                "call `model.set_adapter(name)` with a single adapter (for experts added task by task or modality by "
                "modality, add stages to one adapter: `model.base_model.add_stage(name, ...)`)."
            )
        adapter = active[0]
        input_shape = hidden_states.shape
        stage_eligible = self._stage_eligibility(adapter, input_shape[:-1].numel(), hidden_states.device)
        # (t,) tokens that may use some new expert; None: all tokens
        eligible = None if any(e is None for e in stage_eligible) else torch.stack(stage_eligible).any(0)
        if eligible is not None and not bool(eligible.any()):
            self.routing_records.pop(adapter, None)
            return self.base_layer(hidden_states, *args, **kwargs)
        if not self.extends(adapter):
            return self._observed_forward(adapter, eligible, hidden_states, *args, **kwargs)

        block, family = self.base_layer, self.family
        # the base block's own router jitter (training only): old and new router rows and all experts see it
        hidden = family.jitter(block, hidden_states).reshape(-1, input_shape[-1])  # (t, h)
        base_logits, base_weights, base_index = family.route(block, hidden)  # (t, e), (t, k), (t, k)
        num_stages = self.num_stages(adapter)
        routers = self.stages("router", num_stages, adapter)
        router_weight = routers[0] if num_stages == 1 else torch.cat(routers)  # (n, h), n over every stage
        new_logits = F.linear(hidden.to(router_weight.dtype), router_weight)  # (t, n)
        sizes = [router.shape[0] for router in routers]
        if num_stages > 1 and any(e is not None for e in stage_eligible):
            new_logits = _mask_ineligible_stages(new_logits, stage_eligible, sizes)
        logits, top_k_index, top_k_weights = extended_routing(
            family,
            base_logits,
            new_logits,
            base_index.shape[-1],
            family.renormalize(block),
            self._calibration(adapter, stage_eligible),
        )
        top_k_weights = top_k_weights.to(base_weights.dtype)
        if eligible is not None:
            # Tokens that no stage serves keep the base router's exact choice and weights.
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
        apply_gate = getattr(experts, "_apply_gate", None) or _default_gate(experts.act_fn)
        first_expert = num_base
        for k, size in enumerate(sizes):  # one batched call per stage (a handful), each over all its experts
            routed = routed + added_experts_forward(
                hidden,
                top_k_index,
                top_k_weights,
                first_expert,
                self.added_experts(adapter, k),
                apply_gate,
                weights_scale_input=family.weights_scale_input,
            )
            first_expert += size
        out = family.add_shared_expert(block, hidden, routed).reshape(input_shape)
        if family.weights_scale_input:
            return out, base_logits
        return out

    def _calibration(
        self, adapter: str, stage_eligible: list[torch.Tensor | None]
    ) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The correction of the routing probabilities `(t, e+n)` -> `(t, e+n)`: each token takes the calibration
        of the latest stage that serves it, over the experts up to that stage (so a stage never changes the routing
        of tokens that only earlier stages serve). None without calibration."""
        num_stages = self.num_stages(adapter)
        pairs = list(
            zip(
                self.stages("calibration_in", num_stages, adapter),
                self.stages("calibration_out", num_stages, adapter),
                strict=True,
            )
        )
        if not pairs:
            return None
        if self.moextend_settings[adapter].last_stage_serves_all:  # every token takes the last stage's calibration
            weight_in, weight_out = pairs[-1]
            return lambda probs: calibration_correction(probs.to(weight_in.dtype), weight_in, weight_out).float()

        def correction(probs: torch.Tensor) -> torch.Tensor:
            total = probs.shape[-1]
            latest = torch.zeros(probs.shape[0], dtype=torch.long, device=probs.device)  # (t,)
            corrections = []
            for k, ((weight_in, weight_out), served) in enumerate(zip(pairs, stage_eligible, strict=True)):
                width = weight_in.shape[-1]
                stage_correction = calibration_correction(probs[:, :width].to(weight_in.dtype), weight_in, weight_out)
                corrections.append(F.pad(stage_correction.float(), (0, total - width)))
                latest = torch.full_like(latest, k) if served is None else torch.where(served, k, latest)
            return torch.stack(corrections).gather(0, latest[None, :, None].expand(1, -1, total))[0]

        return correction

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


def _mask_ineligible_stages(
    new_logits: torch.Tensor, stage_eligible: list[torch.Tensor | None], sizes: list[int]
) -> torch.Tensor:
    """`new_logits` `(t, n)` with -inf where a token may not use a stage's experts (its `restrict_to_modalities`)."""
    allowed = torch.cat(
        [
            torch.ones(new_logits.shape[0], size, dtype=torch.bool, device=new_logits.device)
            if served is None
            else served[:, None].expand(-1, size)
            for served, size in zip(stage_eligible, sizes, strict=True)
        ],
        dim=1,
    )
    return new_logits.masked_fill(~allowed, float("-inf"))


def _any_equal(values: torch.Tensor, targets: tuple[int, ...]) -> torch.Tensor:
    """Bool of `values`' shape: the entries equal to one of the few `targets` (ints, no device copy)."""
    result = values == targets[0]
    for target in targets[1:]:
        result = result | (values == target)
    return result
