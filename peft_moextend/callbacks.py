"""`Trainer` integration: log the router load-balancing loss next to the training loss."""

from __future__ import annotations

import torch
from transformers import Trainer, TrainerCallback

from .forward_context import ForwardContext


class RouterAuxLossCallback(TrainerCallback):
    """Adds `router_aux_loss` (mean over the training forwards since the last log) to the Trainer's logs.

    The loss the Trainer optimises already contains `router_aux_loss_coef * router_aux_loss`; this callback only
    makes the term visible. Attach it with `add_router_aux_loss_logging(trainer)`, which puts it first so that the
    reporting integrations (TensorBoard, W&B, ...) see the value too.
    """

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        context = _context_of(model)
        if context is None or not context.training_aux_losses or logs is None or "loss" not in logs:
            return
        value = float(torch.stack(context.training_aux_losses).mean())
        context.training_aux_losses.clear()
        logs["router_aux_loss"] = value
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1]["router_aux_loss"] = value


def add_router_aux_loss_logging(trainer: Trainer) -> RouterAuxLossCallback:
    """Log `router_aux_loss` with `trainer`'s training logs; returns the callback."""
    callback = RouterAuxLossCallback()
    trainer.callback_handler.callbacks.insert(0, callback)
    return callback


def _context_of(model) -> ForwardContext | None:
    if model is None:
        return None
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.__dict__.get(ForwardContext._ATTRIBUTE)
