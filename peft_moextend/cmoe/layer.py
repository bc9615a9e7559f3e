"""CMoE tuner layer: a linear base layer plus low-rank experts added task by task, one router per task.

Einstein notation: t - tokens, i - in features, o - out features, e - experts of the layer up to a task, r - rank.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..forward_context import ForwardContext
from ..quantization import linear_features
from ..tuner_utils import stage_container
from .config import CMoEConfig
from .locator import locator_size, task_scores


class CMoELayer(nn.Module, BaseTunerLayer):
    """A linear `base_layer` (frozen) plus, per adapter and task k, optional experts and a router.

    Added tensors, in containers keyed by adapter (task k's containers are named with its index, so that every
    saved key ends in `<container>`): `cmoe_A_k` `(n_k*r, i)` and `cmoe_B_k` `(o, n_k*r)` (zero-initialised) for the
    n_k experts task k added here, and `cmoe_router_k` `(e_k, i)` over all e_k experts up to task k. Task k routes
    only over those e_k experts, whose tensors never change after task k: adding tasks never changes task k's
    outputs. The layer that sees the model's input first also holds the task locator (`cmoe_locator_k`).
    """

    def __init__(self, base_layer: nn.Module, module_name: str, context: ForwardContext, is_locator: bool) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.module_name = module_name
        self.in_features, self.out_features = linear_features(base_layer, module_name, "CMoE")
        self._context = context
        self.is_locator = is_locator
        self.adapter_layer_names: tuple[str, ...] = ()
        self.other_param_names: tuple[str, ...] = ("cmoe_scaling", "cmoe_experts")
        self.frozen_peft_weight_names: dict[str, tuple[str, ...]] = {}
        self.cmoe_scaling: dict[str, float] = {}
        self.cmoe_experts: dict[str, list[int]] = {}  # adapter -> experts added by each task
        self.cmoe_settings: dict[str, CMoEConfig] = {}
        self._disable_adapters = False
        self.merged_adapters = []

    def _container(self, kind: str, task: int) -> nn.ParameterDict:
        return stage_container(self, f"cmoe_{kind}_{task}", trainable=kind != "locator")

    def add_task(self, adapter_name: str, config: CMoEConfig, extend: bool) -> None:
        """Append the next task of `adapter_name`: `config.experts_per_task` experts if `extend`, and its router."""
        task = len(self.cmoe_experts.setdefault(adapter_name, []))
        self.cmoe_settings[adapter_name] = config
        self.cmoe_scaling[adapter_name] = config.lora_alpha / config.r
        device = next(self.base_layer.parameters()).device
        added = config.experts_per_task if extend else 0
        if added:
            weight_a = torch.empty(added * config.r, self.in_features)
            for expert in weight_a.view(added, config.r, self.in_features):
                nn.init.kaiming_uniform_(expert, a=math.sqrt(5))
            self._container("A", task)[adapter_name] = nn.Parameter(weight_a.to(device))
            self._container("B", task)[adapter_name] = nn.Parameter(
                torch.zeros(self.out_features, added * config.r, device=device)
            )
        self.cmoe_experts[adapter_name].append(added)
        total = sum(self.cmoe_experts[adapter_name])
        if total:
            self._container("router", task)[adapter_name] = nn.Parameter(
                torch.zeros(total, self.in_features, device=device)
            )
        # earlier tasks stay frozen, whatever set_adapter does later
        self.frozen_peft_weight_names[adapter_name] = tuple(
            f"cmoe_{kind}_{k}" for k in range(task) for kind in ("A", "B", "router")
        )
        self.set_adapter(self.active_adapters)

    def remove_last_task(self, adapter_name: str) -> None:
        """Drop the most recent task of `adapter_name` (used to discard PGKE probes)."""
        task = len(self.cmoe_experts[adapter_name]) - 1
        for kind in ("A", "B", "router"):
            container = getattr(self, f"cmoe_{kind}_{task}", None)
            if container is not None and adapter_name in container:
                del container[adapter_name]
        self.cmoe_experts[adapter_name].pop()

    def set_locator(self, adapter_name: str, task: int, vector: torch.Tensor) -> None:
        self._container("locator", task)[adapter_name] = nn.Parameter(vector, requires_grad=False)

    def add_locator_placeholder(self, adapter_name: str, task: int) -> None:
        config = self.cmoe_settings[adapter_name]
        size = locator_size(config.locator, self.in_features, config.locator_latent_size)
        self.set_locator(adapter_name, task, torch.zeros(size))

    def pooled_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """`(b, i)` mean of each sample's input tokens (padding excluded)."""
        x = x.reshape(x.shape[0], -1, x.shape[-1]) if x.dim() > 2 else x.unsqueeze(0)
        mask = self._context.attention_mask
        if mask is None or tuple(mask.shape) != tuple(x.shape[:2]):
            return x.mean(dim=1)
        weights = mask.to(x.dtype).unsqueeze(-1)
        return (x * weights).sum(1) / weights.sum(1).clamp_min(1)

    def _resolve_task_ids(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """Per-sample task index `(b,)`: explicit `task=`, else (training, or a single task) the newest task, else
        the locator."""
        context, tasks = self._context, [t["name"] for t in self.cmoe_settings[adapter_name].tasks]
        batch = x.shape[0] if x.dim() > 2 else 1
        if context.is_continuation and context.task_ids is not None:
            return context.task_ids
        request = context.task_request
        if request is not None:
            names = [request] * batch if isinstance(request, str) else list(request)
            unknown = sorted(set(names) - set(tasks))
            if unknown or len(names) != batch:
                raise ValueError(f"`task` must be one of {tasks} (one name, or one per sample), got {request!r}.")
            return torch.tensor([tasks.index(n) for n in names], device=x.device)
        if self.training or len(tasks) == 1:  # the task being trained, or the only one
            return torch.full((batch,), len(tasks) - 1, device=x.device)
        fitted = [k for k in range(len(tasks)) if adapter_name in getattr(self, f"cmoe_locator_{k}", {})]
        if len(fitted) != len(tasks):
            missing = [tasks[k] for k in range(len(tasks)) if k not in fitted]
            raise ValueError(
                f"No task was given and the task locator is not fitted for {missing}: pass `task=` to the model's "
                "forward/generate, or call `model.base_model.fit_locator(task, batches)` for every task."
            )
        config = self.cmoe_settings[adapter_name]
        models = [getattr(self, f"cmoe_locator_{k}")[adapter_name] for k in range(len(tasks))]
        scores = task_scores(config.locator, self.pooled_inputs(x), models, config.locator_latent_size)
        return scores.argmax(dim=-1)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """x: `(..., i)`; returns `(..., o)`."""
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters or self.merged:
            return result
        if self.is_locator and self.training and torch.is_grad_enabled():
            empty = [a for a in self.active_adapters if a in self.cmoe_experts and not self.cmoe_experts[a]]
            if empty:
                raise ValueError(
                    f"CMoE adapter {empty[0]!r} has no task yet, so there is nothing to train: call "
                    "`model.base_model.add_task(name, probe_data=...)` first."
                )
        active = [a for a in self.active_adapters if self.cmoe_experts.get(a)]
        if not active:
            return result
        for adapter in active:
            if self.is_locator:
                self._context.task_ids = self._resolve_task_ids(adapter, x)
            task_ids = self._context.task_ids
            if task_ids is None:
                raise ValueError("CMoE could not tell the task of this call: pass `task=` to forward/generate.")
            result = result + self._mixture(adapter, x, task_ids).to(result.dtype)
        return result

    def _mixture(self, adapter: str, x: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        """Each sample's task router mixes that task's experts; one batched pass per task present."""
        tokens = x.reshape(-1, x.shape[-1])  # (t, i)
        per_sample = tokens.shape[0] // task_ids.shape[0]
        token_task = task_ids.repeat_interleave(per_sample)  # (t,)
        delta = tokens.new_zeros(tokens.shape[0], self.out_features, dtype=torch.float32)
        rank, scaling = self.cmoe_settings[adapter].r, self.cmoe_scaling[adapter]
        for task in torch.unique(token_task).tolist():
            routers = getattr(self, f"cmoe_router_{task}", None)
            if routers is None or adapter not in routers:  # no expert in this layer up to this task
                continue
            router = routers[adapter]
            owners = [k for k in range(task + 1) if self.cmoe_experts[adapter][k]]
            weight_a = torch.cat([getattr(self, f"cmoe_A_{k}")[adapter] for k in owners])  # (e*r, i)
            weight_b = torch.cat([getattr(self, f"cmoe_B_{k}")[adapter] for k in owners], dim=1)  # (o, e*r)
            rows = token_task == task
            inputs = tokens[rows].to(weight_a.dtype) if not bool(rows.all()) else tokens.to(weight_a.dtype)
            gates = F.softmax(F.linear(inputs, router), dim=-1)  # (t, e)
            hidden = F.linear(inputs, weight_a).view(-1, gates.shape[-1], rank) * gates.unsqueeze(-1)
            out = F.linear(hidden.flatten(1), weight_b) * scaling  # (t, o)
            if bool(rows.all()):
                delta = out
            else:
                delta[rows] = out
        return delta.reshape(*x.shape[:-1], -1)

    def __repr__(self) -> str:
        return "cmoe." + super().__repr__()
