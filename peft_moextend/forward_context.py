"""What adapter layers need to know about the current forward call, and what they add to its outputs.

Hooks on the wrapped transformers model (not on the PEFT wrapper) make one mechanism serve every entry point:
`PeftModel` with or without a task type, `generate()` (every decoding step), the `Trainer`, and models that got
their adapters through transformers' `load_adapter`.

- Before each call: an explicit `modality_ids` keyword (ints `(batch, seq)` indexing `modality.MODALITIES`) is
  popped from the call. It gives the modality of every token of a call whose tokens it matches in shape; in later
  calls of the same `generate()` (the decoding steps, whose tokens it does not match) the new tokens are text.
  Without it, modalities come from the placeholder tokens in `input_ids`. The attention mask is kept, and routed
  layers forget their previous routing record.
- After each call: the routed layers' load-balancing losses are returned as `outputs.router_aux_loss` and, when
  labels were given, added to `outputs.loss` with each adapter's `router_aux_loss_coef`.
- The model's `forward` signature gains `modality_ids` and `task` keywords so that the `Trainer` keeps such dataset
  columns instead of silently dropping them (it keeps only columns named in the signature). `task` (a task name,
  or one per sample) selects CMoE's task router; it is kept for the decoding steps of a cached `generate()`.
Values stay set until the next call so that gradient-checkpointing recomputation sees them.
"""

from __future__ import annotations

import inspect
import types

import torch
from torch import nn

from .modality import MODALITIES, modality_ids_from_input_ids, modality_token_ids
from .routing import router_aux_loss


class ForwardContext:
    """Per-call inputs shared by all adapter layers of one model; get it with `ForwardContext.of(model)`.

    Layers that route expose `routing_record` / `router_aux_loss_coef` (found by walking the model on each call,
    which also holds for copies of the model) and declare the non-text modalities they must tell apart in
    `required_modalities`.
    """

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
        self.required_modalities: set[str] = set()
        self._routed_layers: list[nn.Module] = []
        # CMoE: the `task` keyword of the call, whether it continues a cached generation, and the resolved
        # per-sample task indices (kept across the decoding steps of one generate())
        self.task_request: str | list[str] | None = None
        self.is_continuation = False
        self.task_ids: torch.Tensor | None = None
        self.training_aux_losses: list[torch.Tensor] = []  # read and cleared by RouterAuxLossCallback
        model.register_forward_pre_hook(self._before_forward, with_kwargs=True)
        model.register_forward_hook(self._after_forward, with_kwargs=True)
        _add_modality_ids_to_forward_signature(model)

    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        explicit = kwargs.pop("modality_ids", None)
        self.task_request = kwargs.pop("task", None)
        cache = kwargs.get("past_key_values")
        self.is_continuation = bool(cache is not None and hasattr(cache, "get_seq_length") and cache.get_seq_length())
        if not self.is_continuation:
            self.task_ids = None
        input_ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None)
        reference = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
        if explicit is not None:
            if not isinstance(explicit, torch.Tensor) or explicit.dim() != 2 or explicit.is_floating_point():
                raise ValueError(
                    "`modality_ids` must be an integer tensor of shape (batch, seq) with values indexing "
                    f"{list(MODALITIES)}, got {type(explicit).__name__} {tuple(getattr(explicit, 'shape', ()))}."
                )
            if reference is None:
                self.modality_ids = None
            elif tuple(explicit.shape) == tuple(reference.shape[:2]):
                self.modality_ids = explicit.to(reference.device)
            else:  # a later decoding step of generate(): the new tokens are text
                self.modality_ids = torch.zeros(reference.shape[:2], dtype=torch.long, device=reference.device)
        elif input_ids is not None:
            missing = sorted(self.required_modalities - set(self.token_ids))
            if missing:
                raise ValueError(
                    f"The adapter needs to tell {missing} tokens apart, but this model's config has no placeholder "
                    f"token id for them (looked for e.g. `{missing[0]}_token_id` / `{missing[0]}_token_index`). "
                    "Pass an explicit `modality_ids` tensor of shape (batch, seq) to the model's forward/generate "
                    f"(values index {list(MODALITIES)})."
                )
            self.modality_ids = modality_ids_from_input_ids(input_ids, self.token_ids)
        else:
            self.modality_ids = None
        self.attention_mask = kwargs.get("attention_mask")
        self._routed_layers = [m for m in module.modules() if hasattr(m, "router_aux_loss_coef")]
        for layer in self._routed_layers:
            layer.routing_record = None
        return args, kwargs

    def _after_forward(self, module: nn.Module, args: tuple, kwargs: dict, outputs):
        if not isinstance(outputs, dict):
            return outputs
        losses = router_aux_loss(self._routed_layers)
        if losses is None:
            return outputs
        weighted, raw = losses
        if kwargs.get("labels") is not None and outputs.get("loss") is not None:
            if (
                torch.is_grad_enabled()
                and outputs["loss"].requires_grad
                and not weighted.requires_grad
                and any(
                    layer.routing_record is not None and layer.router_aux_loss_coef > 0 for layer in self._routed_layers
                )
            ):
                raise RuntimeError(
                    "The router load-balancing loss cannot get gradients: the routed layers ran without autograd, "
                    "which is what reentrant gradient checkpointing does. Enable checkpointing with "
                    "`gradient_checkpointing_kwargs={'use_reentrant': False}` (in TrainingArguments, "
                    "`model.gradient_checkpointing_enable(...)` or `prepare_model_for_kbit_training(...)`), or set "
                    "`router_aux_loss_coef=0`."
                )
            outputs["loss"] = outputs["loss"] + weighted.to(outputs["loss"].device)
        outputs["router_aux_loss"] = raw
        if module.training:
            self.training_aux_losses.append(raw.detach())
        return outputs

    def token_modality_ids(self, num_tokens: int) -> torch.Tensor | None:
        """Flattened `(num_tokens,)` modality ids of the current call, or None when unknown / not matching."""
        if self.modality_ids is None or self.modality_ids.numel() != num_tokens:
            return None
        return self.modality_ids.reshape(-1)

    def layer_modality_ids(
        self, num_tokens: int, tower_modality: str | None, device: torch.device, method: str
    ) -> torch.Tensor:
        """`(num_tokens,)` modality id of every token a layer sees: its tower's modality inside a vision/audio tower,
        else the call's per-position ids; a clear error when they are unknown."""
        if tower_modality is not None:
            return torch.full((num_tokens,), MODALITIES.index(tower_modality), device=device)
        modality_ids = self.token_modality_ids(num_tokens)
        if modality_ids is None:
            raise ValueError(
                f"{method} needs the modality of each of the {num_tokens} tokens of this layer, but it is unknown for "
                "this call: pass `input_ids` (with the model's placeholder tokens) or an explicit integer "
                "`modality_ids` tensor of shape (batch, seq) to the model's forward/generate."
            )
        return modality_ids.to(device)

    def token_attention_mask(self, num_tokens: int) -> torch.Tensor | None:
        """Flattened `(num_tokens,)` bool mask of non-padding tokens, or None when unknown / not matching."""
        mask = self.attention_mask
        if mask is None or mask.dim() != 2 or mask.numel() != num_tokens:
            return None
        return mask.reshape(-1).bool()


def _add_modality_ids_to_forward_signature(model: nn.Module) -> None:
    """Give `model.forward` a visible `modality_ids` keyword (the pre-hook consumes it before `forward` runs)."""
    class_forward = type(model).forward
    signature = inspect.signature(class_forward)
    if "modality_ids" in signature.parameters:
        return
    parameters = list(signature.parameters.values())
    position = next((i for i, p in enumerate(parameters) if p.kind is inspect.Parameter.VAR_KEYWORD), len(parameters))
    for name in ("task", "modality_ids"):
        parameters.insert(position, inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None))

    def forward(self, *args, modality_ids=None, task=None, **kwargs):
        return class_forward(self, *args, **kwargs)

    forward.__signature__ = signature.replace(parameters=parameters)
    forward.__doc__ = class_forward.__doc__
    # A method bound to the instance: `copy.deepcopy` rebinds it to the copy, and it closes over nothing else.
    model.forward = types.MethodType(forward, model)
