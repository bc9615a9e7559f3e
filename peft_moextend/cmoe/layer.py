"""CMoE tuner layer: a linear base layer plus low-rank experts added task by task, one router per task.

Einstein notation: t - tokens, i - in features, o - out features, e - experts of the layer up to a task, r - rank.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..call_inputs import CallInputs
from ..experts import gated_low_rank_mixture, kaiming_uniform_experts
from ..modality import modality_index
from ..registration import METHODS, ExpertPeftType
from ..routing import RoutedLayer, RoutingRecord
from ..tuner_utils import LinearExpertLayer, StagedParameters
from .config import CMoEConfig
from .locator import locate, locator_size, task_scores
from .router import initial_router, task_gates

_TRAINED_KINDS = ("A", "B", "router")  # per-task tensors trained by backprop
_FITTED_KINDS = ("locator", "threshold")  # per-task tensors fitted outside backprop (float32, never trained)


class TaskSelection:
    """The per-sample task of the current call, per CMoE adapter of one model.

    The adapter's locator layer (the first layer holding the adapter, which every call reaches first) resolves the
    tasks and sets them; the adapter's other layers read them for the same call (`CallInputs.call_index`). They are
    kept across the decoding steps of one cached `generate()`.
    """

    def __init__(self) -> None:
        self._chosen: dict[str, tuple[int, torch.Tensor]] = {}
        self._present_of: torch.Tensor | None = None
        self._present: list[int] = []

    def set(self, adapter_name: str, call_index: int, task_ids: torch.Tensor) -> None:
        self._chosen[adapter_name] = (call_index, task_ids)

    def of_call(self, adapter_name: str, call_index: int) -> torch.Tensor | None:
        """`(b,)` task indices chosen in call `call_index`, or None."""
        chosen = self._chosen.get(adapter_name)
        return chosen[1] if chosen is not None and chosen[0] == call_index else None

    def tasks_in(self, task_ids: torch.Tensor) -> list[int]:
        """The distinct task indices of `task_ids` `(b,)`; computed once per call, as every layer of the call gets
        the same tensor."""
        if self._present_of is not task_ids:
            self._present_of, self._present = task_ids, torch.unique(task_ids).tolist()
        return self._present

    def latest(self, adapter_name: str) -> torch.Tensor | None:
        """`(b,)` task indices of the adapter's latest call (the previous step of a cached generation)."""
        chosen = self._chosen.get(adapter_name)
        return None if chosen is None else chosen[1]


class CMoELayer(LinearExpertLayer, StagedParameters, RoutedLayer):
    """A linear `base_layer` (frozen) plus, per adapter and task k, optional experts and a router.

    Added tensors, in containers keyed by adapter (task k's containers are named with its index, so that every
    saved key ends in `<container>`): `cmoe_A_k` `(n_k*r, i)` and `cmoe_B_k` `(o, n_k*r)` (zero-initialised) for the
    n_k experts task k added here, and `cmoe_router_k` `(e_k, i)` over all e_k experts up to task k. Task k routes
    only over those e_k experts, whose tensors never change after task k: adding tasks never changes task k's
    outputs. The first layer holding an adapter is its locator layer (`cmoe_is_locator`): it resolves each sample's
    task and holds the task locator (`cmoe_locator_k`). With `top_k`, each task router's routing is recorded for the
    load-balancing loss (`routing_records`, keyed `"<adapter>/task<k>"`: one record per task present in the call).
    """

    method_name = METHODS[ExpertPeftType.CMOE].name
    stage_prefix = METHODS[ExpertPeftType.CMOE].prefix

    def __init__(
        self, base_layer: nn.Module, module_name: str, call_inputs: CallInputs, task_selection: TaskSelection
    ) -> None:
        super().__init__(base_layer, module_name, call_inputs)
        self.task_selection = task_selection
        self.init_stages()
        self.other_param_names: tuple[str, ...] = ("cmoe_settings", "cmoe_experts", "cmoe_is_locator")
        self.cmoe_settings: dict[str, CMoEConfig] = {}  # adapter -> its settings (PGKE swaps in a probe's copy)
        self.cmoe_experts: dict[str, list[int]] = {}  # adapter -> experts added by each task
        self.cmoe_is_locator: dict[str, bool] = {}
        self.routing_records: dict[str, RoutingRecord] = {}

    def add_adapter(self, adapter_name: str, config: CMoEConfig, is_locator: bool) -> None:
        """Hold adapter `adapter_name` (no task yet); `is_locator`: this is the adapter's first layer."""
        self.cmoe_settings[adapter_name] = config
        self.cmoe_experts.setdefault(adapter_name, [])
        self.cmoe_is_locator[adapter_name] = is_locator

    def add_task(self, adapter_name: str, config: CMoEConfig, extend: bool) -> None:
        """Append the next task of `adapter_name`: `config.experts_per_task` experts if `extend`, and its router."""
        task = len(self.cmoe_experts[adapter_name])
        added = config.experts_per_task if extend else 0
        if added:
            self.add_stage("A", task)[adapter_name] = nn.Parameter(
                kaiming_uniform_experts(added, config.r, self.in_features)
            )
            self.add_stage("B", task)[adapter_name] = nn.Parameter(torch.zeros(self.out_features, added * config.r))
        self.cmoe_experts[adapter_name].append(added)
        total = sum(self.cmoe_experts[adapter_name])
        if total:
            self.add_stage("router", task)[adapter_name] = nn.Parameter(
                initial_router(total, self.in_features, config.top_k)
            )
        self.place_adapter(adapter_name)
        self.freeze_before(adapter_name, task, _TRAINED_KINDS)
        self.set_adapter(self.active_adapters)

    def remove_last_task(self, adapter_name: str) -> None:
        """Drop the most recent task of `adapter_name` (used to discard PGKE probes)."""
        self.drop_stage(_TRAINED_KINDS, len(self.cmoe_experts[adapter_name]) - 1, adapter_name)
        self.cmoe_experts[adapter_name].pop()

    def place_adapter(self, adapter_name: str) -> None:
        super().place_adapter(adapter_name)
        for task in range(len(self.cmoe_experts.get(adapter_name, ()))):  # fitted tensors stay float32 on every base
            for kind in _FITTED_KINDS:
                fitted = self.stage(kind, task, adapter_name)
                if fitted is not None:
                    self.add_stage(kind, task, trainable=False)[adapter_name] = nn.Parameter(
                        fitted.float(), requires_grad=False
                    )

    def set_locator(self, adapter_name: str, task: int, vector: torch.Tensor) -> None:
        """Store task `task`'s density model (a flat float32 vector, never trained by backprop)."""
        locators = self.add_stage("locator", task, trainable=False)
        locators[adapter_name] = nn.Parameter(vector.float(), requires_grad=False)

    def set_threshold(self, adapter_name: str, task: int, value: float) -> None:
        """Store the score below which an input is not task `task`'s."""
        self.add_stage("threshold", task, trainable=False)[adapter_name] = nn.Parameter(
            torch.tensor([float(value)], device=self._device()), requires_grad=False
        )

    def add_locator_placeholder(self, adapter_name: str, task: int, rejects: bool) -> None:
        config = self.cmoe_settings[adapter_name]
        features = 2 * self.in_features + 1 if config.locator_features == "by_modality" else self.in_features
        size = locator_size(config.locator, features, config.locator_latent_size)
        self.set_locator(adapter_name, task, torch.zeros(size, device=self._device()))
        if rejects:
            self.set_threshold(adapter_name, task, 0.0)

    def _device(self) -> torch.device:
        return next(self.base_layer.parameters()).device

    def pooled_inputs(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """`(b, f)` locator features of each sample from this layer's input `x` `(b, s, i)`: the mean of its tokens
        (padding excluded), or for "by_modality" the mean of its text tokens, the mean of its media tokens (zeros
        where it has none) and its share of media tokens (`f = 2i + 1`)."""
        x = x.reshape(x.shape[0], -1, x.shape[-1]) if x.dim() > 2 else x.unsqueeze(0)
        mask = self.call_inputs.attention_mask
        if mask is None or tuple(mask.shape) != tuple(x.shape[:2]):
            mask = torch.ones(x.shape[:2], device=x.device)
        weights = mask.to(x.dtype).unsqueeze(-1)  # (b, s, 1)
        if self.cmoe_settings[adapter_name].locator_features == "mean":
            return (x * weights).sum(1) / weights.sum(1).clamp_min(1)
        is_text = self.modality_ids(x.shape[0] * x.shape[1], (), x.device).view(x.shape[0], x.shape[1]) == 0
        parts = []
        for part in (is_text, ~is_text):
            part_weights = weights * part.unsqueeze(-1).to(x.dtype)
            parts.append((x * part_weights).sum(1) / part_weights.sum(1).clamp_min(1))
        # the share of media tokens: a sample without media is not at the centre of a media task's features
        media_share = (weights * (~is_text).unsqueeze(-1).to(x.dtype)).sum(1) / weights.sum(1).clamp_min(1)
        return torch.cat([*parts, media_share], dim=-1)

    def task_locators(self, adapter_name: str) -> tuple[list[torch.Tensor], list[float | None]]:
        """Every task's density model and rejection threshold (None: the task claims every input)."""
        tasks = len(self.cmoe_settings[adapter_name].tasks)
        models = [self.stage("locator", k, adapter_name) for k in range(tasks)]
        thresholds = [self.stage("threshold", k, adapter_name) for k in range(tasks)]
        return models, [None if t is None else float(t) for t in thresholds]

    def _resolve_task_ids(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """Per-sample task index `(b,)`, -1 for the base path: the previous step's in a cached generation, else
        explicit `task=`, else (training) the newest task, else the locator (with a single task and no fitted
        locator: that task)."""
        inputs, config = self.call_inputs, self.cmoe_settings[adapter_name]
        tasks = [t["name"] for t in config.tasks]
        batch = x.shape[0] if x.dim() > 2 else 1
        previous = self.task_selection.latest(adapter_name)
        if inputs.is_continuation and previous is not None and previous.shape[0] == batch:
            return previous
        request = inputs.task_request
        if request is not None:
            names = [request] * batch if isinstance(request, str) else list(request)
            unknown = sorted(set(names) - set(tasks))
            if unknown or len(names) != batch:
                raise ValueError(f"`task` must be one of {tasks} (one name, or one per sample), got {request!r}.")
            return torch.tensor([tasks.index(n) for n in names], device=x.device)
        if self.training:  # the task being trained
            return torch.full((batch,), len(tasks) - 1, device=x.device)
        fitted = [k for k in range(len(tasks)) if self.stage("locator", k, adapter_name) is not None]
        if len(fitted) != len(tasks):
            if len(tasks) == 1:
                return torch.zeros(batch, dtype=torch.long, device=x.device)
            missing = [tasks[k] for k in range(len(tasks)) if k not in fitted]
            raise ValueError(
                f"No task was given and the task locator is not fitted for {missing}: pass `task=` to the model's "
                "forward/generate, or call `model.base_model.fit_locator(task, batches)` for every task."
            )
        models, thresholds = self.task_locators(adapter_name)
        scores = task_scores(config.locator, self.pooled_inputs(adapter_name, x), models, config.locator_latent_size)
        return locate(scores, thresholds)

    def _task_ids(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """`(b,)` task of each sample for this call: resolved here on the adapter's locator layer, else read."""
        call_index = self.call_inputs.call_index
        if self.cmoe_is_locator.get(adapter_name):
            task_ids = self._resolve_task_ids(adapter_name, x)
            self.task_selection.set(adapter_name, call_index, task_ids)
            return task_ids
        task_ids = self.task_selection.of_call(adapter_name, call_index)
        if task_ids is None:
            raise ValueError(
                f"CMoE could not tell the task of this call for adapter {adapter_name!r}: its first layer did not run "
                "before this one. Pass `task=` to forward/generate."
            )
        return task_ids

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """x: `(..., i)`; returns `(..., o)`."""
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters or self.merged:
            return result
        for adapter in self.active_adapters:
            if adapter not in self.cmoe_experts:
                continue
            if not self.cmoe_experts[adapter]:
                if self.cmoe_is_locator.get(adapter) and self.training and torch.is_grad_enabled():
                    raise ValueError(
                        f"CMoE adapter {adapter!r} has no task yet, so there is nothing to train: call "
                        "`model.base_model.add_task(name, probe_data=...)` first."
                    )
                continue
            delta = self._mixture(adapter, x, self._task_ids(adapter, x))
            if delta is not None:
                result = result + delta.to(result.dtype)
        return result

    def _eligible_tokens(self, adapter: str, num_tokens: int, device: torch.device) -> torch.Tensor | None:
        """`(t,)` bool: tokens the adapter's experts act on (`restrict_to_modalities`); None means all tokens."""
        allowed = self.cmoe_settings[adapter].restrict_to_modalities
        if allowed is None:
            return None
        ids = self.modality_ids(num_tokens, allowed, device)
        return torch.isin(ids, torch.tensor([modality_index(m) for m in allowed], device=device))

    def _task_weights(self, adapter: str, owners: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The experts of tasks `owners` side by side: A `(e*r, i)`, B `(o, e*r)` (no copy for a single task)."""
        if len(owners) == 1:
            return self.stage("A", owners[0], adapter), self.stage("B", owners[0], adapter)
        weight_a = torch.cat([self.stage("A", k, adapter) for k in owners])
        weight_b = torch.cat([self.stage("B", k, adapter) for k in owners], dim=1)
        return weight_a, weight_b

    def _mixture(self, adapter: str, x: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor | None:
        """`(..., o)`: each sample's task router mixes that task's experts; one batched pass per task present. None
        when no token gets a delta (no task present has experts in this layer, or no token is eligible)."""
        tokens = x.reshape(-1, x.shape[-1])  # (t, i)
        eligible = self._eligible_tokens(adapter, tokens.shape[0], x.device)
        tasks_present = self.task_selection.tasks_in(task_ids)
        token_task = None  # (t,), built only when the call mixes tasks or restricts tokens
        if eligible is not None or len(tasks_present) > 1:
            token_task = task_ids.repeat_interleave(tokens.shape[0] // task_ids.shape[0])
            if eligible is not None:
                token_task = torch.where(eligible, token_task, -1)  # -1: no task's experts
            tasks_present = torch.unique(token_task).tolist()
        config = self.cmoe_settings[adapter]
        scaling = config.lora_alpha / config.r
        delta = None
        for task in tasks_present:
            router = self.stage("router", task, adapter) if task >= 0 else None
            if router is None:  # no expert in this layer up to this task
                continue
            owners = [k for k in range(task + 1) if self.cmoe_experts[adapter][k]]
            weight_a, weight_b = self._task_weights(adapter, owners)
            rows = None if token_task is None else token_task == task
            every_row = rows is None or bool(rows.all())
            inputs = self._cast_input_dtype(tokens if every_row else tokens[rows], weight_a.dtype)
            gates = self._task_gates(adapter, task, F.linear(inputs, router), None if every_row else rows)  # (t, e)
            out = gated_low_rank_mixture(inputs, weight_a, weight_b, gates, scaling)  # (t, o)
            if every_row:
                delta = out
            else:
                # in the dtype the experts computed in (bfloat16 under autocast)
                delta = out.new_zeros(tokens.shape[0], out.shape[-1]) if delta is None else delta.to(out.dtype)
                delta[rows] = out
        return None if delta is None else delta.reshape(*x.shape[:-1], -1)

    def _task_gates(self, adapter: str, task: int, logits: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        """Gates `(t, e)` of task `task`'s router from its logits `(t, e)` over the call's tokens `rows` (None: all);
        with `top_k`, the routing is recorded for the load-balancing loss."""
        config = self.cmoe_settings[adapter]
        gates, chosen = task_gates(logits, config.top_k)
        if chosen is not None:
            token_mask = self.call_inputs.token_attention_mask(rows.shape[0] if rows is not None else logits.shape[0])
            if token_mask is not None and rows is not None:
                token_mask = token_mask[rows]
            self.routing_records[f"{adapter}/task{task}"] = RoutingRecord(
                F.softmax(logits.float(), dim=-1), chosen, token_mask, config.router_aux_loss_coef
            )
        return gates

    def __repr__(self) -> str:
        return "cmoe." + super().__repr__()
