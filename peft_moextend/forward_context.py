"""What adapter layers need to know about the current forward call, and what they add to its outputs.

Hooks on the wrapped transformers model (not on the PEFT wrapper) make one mechanism serve every entry point:
`PeftModel` with or without a task type, `generate()` (every decoding step; new tokens are text), the `Trainer`,
and models that got their adapters through transformers' `load_adapter`.

- Before each call: an explicit `modality_ids` keyword (ints `(batch, seq)`, see `modality.MODALITIES`) is popped
  from the call and overrides the placeholder-token derivation when its shape matches the call's tokens; the
  attention mask is kept; routed layers forget their previous routing record.
- After each call: the routed layers' load-balancing losses are returned as `outputs.router_aux_loss` and, when
  labels were given, added to `outputs.loss` with each adapter's `router_aux_loss_coef`.
Values stay set until the next call so that gradient-checkpointing recomputation sees them.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from .modality import modality_ids_from_input_ids, modality_token_ids
from .routing import router_aux_loss


class ForwardContext:
    """Per-call inputs shared by all adapter layers of one model; get it with `ForwardContext.of(model)`."""

    _ATTRIBUTE = "_peft_moextend_forward_context"

    @classmethod
    def of(cls, model: nn.Module) -> ForwardContext:
        """The context attached to `model` (a transformers model), created and hooked on first use."""
        context = model.__dict__.get(cls._ATTRIBUTE)
        if context is None:
            context = cls(model)
            model.__dict__[cls._ATTRIBUTE] = context
        return context

    def __init__(self, model: nn.Module) -> None:
        self.token_ids = modality_token_ids(getattr(model, "config", None))
        self.modality_ids: torch.Tensor | None = None
        self.attention_mask: torch.Tensor | None = None
        self.routed_layers: weakref.WeakSet[nn.Module] = weakref.WeakSet()
        model.register_forward_pre_hook(self._before_forward, with_kwargs=True)
        model.register_forward_hook(self._after_forward, with_kwargs=True)

    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        explicit = kwargs.pop("modality_ids", None)
        if explicit is not None and (
            not isinstance(explicit, torch.Tensor) or explicit.dim() != 2 or explicit.is_floating_point()
        ):
            raise ValueError(
                f"`modality_ids` must be an integer tensor of shape (batch, seq), got {type(explicit).__name__} "
                f"{tuple(getattr(explicit, 'shape', ()))}."
            )
        input_ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None)
        reference = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
        if explicit is not None and reference is not None and tuple(explicit.shape) == tuple(reference.shape[:2]):
            self.modality_ids = explicit.to(reference.device)
        elif input_ids is not None:
            self.modality_ids = modality_ids_from_input_ids(input_ids, self.token_ids)
        else:
            self.modality_ids = None
        self.attention_mask = kwargs.get("attention_mask")
        for layer in self.routed_layers:
            layer.routing_record = None
        return args, kwargs

    def _after_forward(self, module: nn.Module, args: tuple, kwargs: dict, outputs):
        if not isinstance(outputs, dict):
            return outputs
        losses = router_aux_loss(self.routed_layers)
        if losses is None:
            return outputs
        weighted, raw = losses
        if kwargs.get("labels") is not None and outputs.get("loss") is not None:
            outputs["loss"] = outputs["loss"] + weighted.to(outputs["loss"].device)
        outputs["router_aux_loss"] = raw
        return outputs

    def token_modality_ids(self, num_tokens: int) -> torch.Tensor | None:
        """Flattened `(num_tokens,)` modality ids of the current call, or None when unknown / not matching."""
        if self.modality_ids is None or self.modality_ids.numel() != num_tokens:
            return None
        return self.modality_ids.reshape(-1)

    def token_attention_mask(self, num_tokens: int) -> torch.Tensor | None:
        """Flattened `(num_tokens,)` bool mask of non-padding tokens, or None when unknown / not matching."""
        mask = self.attention_mask
        if mask is None or mask.dim() != 2 or mask.numel() != num_tokens:
            return None
        return mask.reshape(-1).bool()
