"""CMoE tuner: tasks added over time (PGKE decides where experts go), a task locator (PTL) for inference."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from transformers.utils.logging import tqdm

from ..registration import METHODS, ExpertPeftType
from ..tuner_utils import ExpertTuner
from .config import CMoEConfig
from .layer import CMoELayer, TaskSelection
from .locator import fit_task_model, locate, rejection_threshold, task_scores


def probe_extends(share: float, chance: float, threshold: float) -> bool:
    """PGKE's rule: extend a layer when its trained probe takes more than its uniform share `chance` = 1/(e+1) of
    the routing (e old experts + the probe) by `threshold` of the rest: `share > chance + threshold * (1 - chance)`.
    An untrained probe sits exactly at chance (its router starts at zero), so only what the probe learned counts. A
    layer without experts yet (chance 1) is always extended: nothing can be reused there."""
    if chance >= 1:
        return True
    return share > chance + threshold * (1 - chance)


class CMoEModel(ExpertTuner):
    """Continual mixture of low-rank experts (LLaVA-CMoE) on the linear layers of a transformers model.

    `add_task(name, probe_data=None)` adds a task (its experts become the trainable parameters; all earlier tasks
    are frozen); `fit_locator(name, batches)` fits the task's density model. `forward`/`generate` accept
    `task="name"` (or one name per sample); without it, the locator picks each sample's task.
    """

    prefix: str = METHODS[ExpertPeftType.CMOE].prefix
    tuner_layer_cls = CMoELayer
    method_name = METHODS[ExpertPeftType.CMOE].name
    merge_refusal = "each sample is routed to its own task's experts, so no single weight update equals the adapter."

    def _pre_injection_hook(self, model: nn.Module, config: CMoEConfig, adapter_name: str) -> None:
        super()._pre_injection_hook(model, config, adapter_name)
        existing = next((m for m in model.modules() if isinstance(m, CMoELayer)), None)
        self.task_selection = existing.task_selection if existing is not None else TaskSelection()

    def _create_and_replace(
        self,
        peft_config: CMoEConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        # the adapter's first layer (module order = the order a call reaches them) resolves each sample's task
        is_locator = not any(adapter_name in m.cmoe_experts for m in self._layers())
        if isinstance(target, CMoELayer):
            layer = target
        else:
            layer = CMoELayer(target, current_key, self.call_inputs, self.task_selection)
            self._install_layer(parent, target_name, target, layer, adapter_name)
        layer.add_adapter(adapter_name, peft_config, is_locator)
        for index, task in enumerate(peft_config.tasks):  # rebuild saved tasks (loading)
            layer.add_task(adapter_name, peft_config, extend=task["layers"] is None or current_key in task["layers"])
            if is_locator and task.get("locator"):
                layer.add_locator_placeholder(adapter_name, index, rejects=bool(task.get("rejects")))

    # -- tasks -------------------------------------------------------------------------------------------------
    def _adapter(self, adapter_name: str | None) -> tuple[str, CMoEConfig]:
        name = adapter_name or self.active_adapters[0]
        return name, self.peft_config[name]

    def _task_index(self, config: CMoEConfig, task: str) -> int:
        names = [t["name"] for t in config.tasks]
        if task not in names:
            raise ValueError(f"Unknown task {task!r}; this adapter's tasks are {names}.")
        return names.index(task)

    def add_task(
        self, name: str, probe_data: Iterable[dict[str, torch.Tensor]] | None = None, adapter_name: str | None = None
    ) -> dict:
        """Add task `name`. With `probe_data` (batches with labels), PGKE attaches one probe expert per layer,
        trains the probes for `probe_steps` batches and extends only the layers where the probe is used more than
        chance (see `probe_extends`); without it, every layer is extended. Returns `{"extended_layers": [...],
        "probe_shares": {layer: share}, "chance_shares": {layer: 1 / (experts + 1)}}`."""
        adapter_name, config = self._adapter(adapter_name)
        if any(t["name"] == name for t in config.tasks):
            raise ValueError(f"Task {name!r} already exists; task names must be unique.")
        layers = {m.module_name: m for m in self._layers() if adapter_name in m.cmoe_experts}
        shares: dict[str, float] = {}
        chance = {key: 1 / (sum(layer.cmoe_experts[adapter_name]) + 1) for key, layer in layers.items()}
        if probe_data is not None and config.probe_steps > 0:
            shares = self._probe(adapter_name, config, layers, probe_data)
            chosen = [key for key, share in shares.items() if probe_extends(share, chance[key], config.probe_threshold)]
        else:
            chosen = list(layers)
        config.tasks.append({"name": name, "layers": sorted(chosen)})
        for key, layer in layers.items():
            layer.add_task(adapter_name, config, extend=key in chosen)
        self._cast_new_stage(adapter_name)
        return {"extended_layers": sorted(chosen), "probe_shares": shares, "chance_shares": chance}

    def _probe(self, adapter_name: str, config: CMoEConfig, layers: dict[str, CMoELayer], batches) -> dict:
        """Train one probe expert per layer as a temporary task (on a copy of the config: the adapter's own config
        never holds the probe; the probe is one expert, routed densely); return each layer's mean gate on it."""
        probe_config = dataclasses.replace(
            config, experts_per_task=1, top_k=None, tasks=[*config.tasks, {"name": "__probe__", "layers": None}]
        )
        was_training = self.model.training
        hooks = []
        try:
            for layer in layers.values():
                layer.cmoe_settings[adapter_name] = probe_config
                layer.add_task(adapter_name, probe_config, extend=True)
            self._cast_new_stage(adapter_name)
            params = [p for p in self.model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=config.probe_learning_rate)
            self.model.train()
            batches = list(itertools.islice(batches, config.probe_steps))
            for batch in tqdm(batches, desc="PGKE probes", leave=False):
                optimizer.zero_grad()
                self.model(**batch).loss.backward()
                optimizer.step()
            shares = {key: [] for key in layers}
            hooks = [
                layer.register_forward_hook(self._share_hook(adapter_name, key, shares))
                for key, layer in layers.items()
            ]
            with torch.no_grad():
                for batch in batches:
                    self.model(**{k: v for k, v in batch.items() if k != "labels"})
        finally:
            for hook in hooks:
                hook.remove()
            self.model.train(was_training)
            for layer in layers.values():
                layer.remove_last_task(adapter_name)
                layer.cmoe_settings[adapter_name] = config
                layer.set_adapter(layer.active_adapters)
        return {key: float(torch.tensor(values).mean()) for key, values in shares.items()}

    @staticmethod
    def _share_hook(adapter_name: str, key: str, shares: dict):
        def hook(layer: CMoELayer, args: tuple, output: torch.Tensor) -> None:
            task = len(layer.cmoe_experts[adapter_name]) - 1
            router = layer.stage("router", task, adapter_name)
            tokens = args[0].reshape(-1, args[0].shape[-1]).to(router.dtype)
            shares[key].append(float(torch.softmax(tokens @ router.T, dim=-1)[:, -1].mean()))

        return hook

    # -- task locator ------------------------------------------------------------------------------------------
    def _locator_layer(self, adapter_name: str) -> CMoELayer:
        return next(m for m in self._layers() if m.cmoe_is_locator.get(adapter_name))

    @torch.no_grad()
    def _pooled(self, adapter_name: str, batches: Iterable[dict[str, torch.Tensor]]) -> torch.Tensor:
        """`(samples, features)` locator features: the input of the adapter's first layer, which no adapter of its
        own precedes; each forward stops as soon as that input is captured."""
        layer = self._locator_layer(adapter_name)
        pooled = []

        def capture(module: CMoELayer, args: tuple) -> None:
            pooled.append(module.pooled_inputs(adapter_name, args[0]))
            raise _Captured

        hook = layer.register_forward_pre_hook(capture)
        try:
            with self._disabled_adapters():
                for batch in batches:
                    try:
                        self.model(**{k: v for k, v in batch.items() if k != "labels"})
                    except _Captured:
                        pass
        finally:
            hook.remove()
        return torch.cat(pooled)

    def fit_locator(
        self, task: str, batches: Iterable[dict[str, torch.Tensor]], adapter_name: str | None = None
    ) -> dict[str, float | None]:
        """Fit task `task`'s density model (PTL) on `batches` of that task's inputs and, with `locator_reject`, the
        threshold of its scores below which an input is not this task's. Returns `{"threshold": ...}`."""
        adapter_name, config = self._adapter(adapter_name)
        index = self._task_index(config, task)
        pooled = self._pooled(adapter_name, batches).float().cpu()
        vector = fit_task_model(config.locator, pooled, config.locator_latent_size, config.locator_epochs)
        layer = self._locator_layer(adapter_name)
        layer.set_locator(adapter_name, index, vector.to(layer._device()))
        config.tasks[index]["locator"] = True
        threshold = None
        if config.locator_reject:
            threshold = rejection_threshold(
                config.locator,
                pooled,
                config.locator_latent_size,
                config.locator_epochs,
                config.locator_reject_quantile,
            )
            layer.set_threshold(adapter_name, index, threshold)
            config.tasks[index]["rejects"] = True
        return {"threshold": threshold}

    def locate(self, batches: Iterable[dict[str, torch.Tensor]], adapter_name: str | None = None) -> list[str | None]:
        """The task the locator picks for every sample of `batches` (None: no task claims it; the base path)."""
        adapter_name, config = self._adapter(adapter_name)
        layer = self._locator_layer(adapter_name)
        names = [t["name"] for t in config.tasks]
        models, thresholds = layer.task_locators(adapter_name)
        scores = task_scores(config.locator, self._pooled(adapter_name, batches), models, config.locator_latent_size)
        return [names[i] if i >= 0 else None for i in locate(scores, thresholds).tolist()]


class _Captured(Exception):
    """Stops a forward once the locator features are captured."""
