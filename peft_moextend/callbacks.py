"""`Trainer` integration: log the router load-balancing loss next to the training loss."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers import Trainer, TrainerCallback


class RouterAuxLossCallback(TrainerCallback):
    """Adds `router_aux_loss` (mean over the training forwards since the last log) to the Trainer's logs.

    The loss the Trainer optimises already contains `router_aux_loss_coef * router_aux_loss`; this callback only
    makes the term visible. It owns its buffer: from `on_train_begin` to `on_train_end` a forward hook on the model
    collects `outputs.router_aux_loss` of training forwards. Attach it with `add_router_aux_loss_logging(trainer)`,
    which puts it first so that the reporting integrations (TensorBoard, W&B, ...) see the value too.
    """

    def __init__(self) -> None:
        self._losses: list[torch.Tensor] = []
        self._handle: RemovableHandle | None = None

    def _collect(self, module: nn.Module, args: tuple, outputs) -> None:
        value = outputs.get("router_aux_loss") if isinstance(outputs, dict) else None
        if module.training and value is not None:
            self._losses.append(value.detach())

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._remove_hook()
        if model is not None:
            self._handle = model.register_forward_hook(self._collect)

    def on_train_end(self, args, state, control, **kwargs):
        self._remove_hook()

    def _remove_hook(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._losses.clear()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self._losses or logs is None or "loss" not in logs:
            return
        value = float(torch.stack([loss.float().cpu() for loss in self._losses]).mean())
        self._losses.clear()
        logs["router_aux_loss"] = value
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1]["router_aux_loss"] = value


def add_router_aux_loss_logging(trainer: Trainer) -> RouterAuxLossCallback:
    """Log `router_aux_loss` with `trainer`'s training logs; returns the callback."""
    callback = RouterAuxLossCallback()
    trainer.callback_handler.callbacks.insert(0, callback)
    return callback
