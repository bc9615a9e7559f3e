"""Per-call inputs of an adapted model: what its adapter layers need to know about the current forward call.

A call's inputs reach the layers for the duration of that call, the way PEFT's own Poly passes `task_ids`:
- `PeftModel.forward` / `generate` enter the tuner's `_enable_peft_forward_hooks` (PEFT's hook point for per-call
  inputs), which runs `call_scope`: a forward pre-hook on the transformers model records every model call inside it
  (each decoding step of `generate`) and a forward hook adds the router load-balancing loss to the outputs; both are
  removed when the call returns.
- A model that got its adapters through transformers' `load_adapter` is called without a PEFT wrapper: its
  `forward` (an instance attribute that exists only while adapters of this package are in the model) records the
  call the same way around the class's forward.
The visible `forward` signature gains `modality_ids` and `task`, so that the `Trainer` keeps such dataset columns
(it keeps only columns named in the signature) and `generate` hands them to every decoding step. `detach` (run by
`unload()` and by deleting the last adapter) removes the instance `forward` and this state: the model is the class's
own again.

What is recorded per model call:
- modalities: an explicit `modality_ids` keyword (ints `(batch, seq)` indexing `modality.MODALITIES`) when it
  matches the call's tokens (in later decoding steps of the same `generate()` the new tokens are text); otherwise
  the placeholder tokens in `input_ids`. Layers ask for what they need (`layer_modality_ids`) and only then get a
  clear error naming what is missing: a disabled or deleted adapter asks for nothing.
- the attention mask (padding stays out of routing statistics and pooled representations);
- `task` (CMoE: a task name, or one per sample) and whether the call continues a cached generation;
- inside a media tower shared by images and videos (Qwen2-VL's `visual`), what the tower is encoding in its
  current call: a pre-hook on the tower, registered for the duration of the model call, compares the tower's
  inputs with the call's video inputs (`pixel_values_videos`, `video_grid_thw`).
The values stay set after the call so that gradient-checkpointing recomputation in the backward pass sees them.
"""

from __future__ import annotations

import functools
import inspect
import types
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager

import torch
from torch import nn

from .compat import check_call_supported
from .modality import MODALITIES, modality_ids_from_input_ids, modality_index, modality_token_ids
from .routing import RoutedLayer, add_router_aux_loss

CALL_KEYWORDS = ("modality_ids", "task")
"""Keywords this package adds to a model's forward/generate; consumed before the model's own forward runs."""

VIDEO_INPUT_KEYWORDS = ("pixel_values_videos", "video_grid_thw")
"""Forward keywords that hold video inputs in transformers' video-language models."""

_ATTRIBUTE = "_peft_moextend_call_inputs"
_UNKNOWN = -1  # `CallInputs._uniform_modality` not yet read from the call's modality ids


class CallInputs:
    """Inputs of the current (or last) call of one adapted transformers model, shared by its adapter layers.

    Get it with `CallInputs.attach(model)`; layers read it through `layer_modality_ids`, `token_attention_mask`,
    `task_request`, `is_continuation`, `call_index` (incremented by every model call) and `uniform_modality`.
    """

    def __init__(self, model: nn.Module) -> None:
        self.token_ids = modality_token_ids(getattr(model, "config", None))
        self.modality_ids: torch.Tensor | None = None  # (batch, seq)
        self.markable: frozenset[str] = frozenset()  # modalities `modality_ids` can tell apart in this call
        self.attention_mask: torch.Tensor | None = None
        self.task_request: str | list[str] | None = None
        self.is_continuation = False
        self.call_index = 0
        # the modality id every token of the call has, when one is known to cover them all (see `uniform_modality`)
        self._uniform_modality: int | None = None
        # the model's routed layers, found at the first call after an injection (`attach` forgets them)
        self.routed_layers: list[nn.Module] | None = None
        self.shared_towers: set[str] = set()  # names of media towers encoding several modalities, with adapters
        self._video_inputs: list[torch.Tensor] = []
        self._tower_modality: str | None = None  # what a shared tower encodes in its current call
        self._scope_depth = 0

    # -- attaching to a model --------------------------------------------------------------------------------------
    @classmethod
    def attach(cls, model: nn.Module) -> CallInputs:
        """The call inputs of `model`, created on first use together with the `forward` keywords; adapter layers
        already in the model (e.g. after the last adapter was deleted and a new one is added) are pointed at it."""
        inputs = model.__dict__.get(_ATTRIBUTE)
        if inputs is None:
            inputs = cls(model)
            model.__dict__[_ATTRIBUTE] = inputs
            _add_call_keywords_to_forward(model)
            for module in model.modules():
                if hasattr(module, "call_inputs"):
                    module.call_inputs = inputs
        inputs.routed_layers = None  # an adapter is about to be injected: find the routed layers again
        return inputs

    @staticmethod
    def detach(model: nn.Module) -> None:
        """Remove the call inputs and the `forward` keywords from `model` (nothing happens if there are none)."""
        if model.__dict__.pop(_ATTRIBUTE, None) is not None:
            model.__dict__.pop("forward", None)

    def register_tower(self, tower_name: str, modality: str) -> None:
        """Note that an adapter layer sits in the media tower `tower_name`; image towers of models that also take
        videos encode both, so their calls need the modality of what they encode."""
        if modality == "image" and "video" in self.token_ids:
            self.shared_towers.add(tower_name)

    # -- one model call ---------------------------------------------------------------------------------------------
    def record_call(self, model: nn.Module, args: tuple, kwargs: dict) -> dict:
        """Record the inputs of one call of `model`; returns `kwargs` without this package's keywords."""
        check_call_supported(model, kwargs)
        kwargs = dict(kwargs)
        explicit = kwargs.pop("modality_ids", None)
        self.task_request = kwargs.pop("task", None)
        self.call_index += 1
        cache = kwargs.get("past_key_values")
        self.is_continuation = bool(cache is not None and hasattr(cache, "get_seq_length") and cache.get_seq_length())
        self._uniform_modality = _UNKNOWN
        input_ids = kwargs.get("input_ids")
        if input_ids is None and args and isinstance(args[0], torch.Tensor) and not args[0].is_floating_point():
            input_ids = args[0]
        reference = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
        if explicit is not None:
            if not isinstance(explicit, torch.Tensor) or explicit.dim() != 2 or explicit.is_floating_point():
                raise ValueError(
                    "`modality_ids` must be an integer tensor of shape (batch, seq) with values indexing "
                    f"{list(MODALITIES)}, got {type(explicit).__name__} {tuple(getattr(explicit, 'shape', ()))}."
                )
            self.markable = frozenset(MODALITIES)
            if reference is None or tuple(explicit.shape) == tuple(reference.shape[:2]):
                # a model without input_ids/inputs_embeds (e.g. forward(X)): layers match the ids by token count
                self.modality_ids = explicit if reference is None else explicit.to(reference.device)
            else:  # a later decoding step of generate(): the new tokens are text
                self.modality_ids = torch.zeros(reference.shape[:2], dtype=torch.long, device=reference.device)
                self._uniform_modality = 0
        elif input_ids is not None:
            self.markable = frozenset(("text", *self.token_ids))
            self.modality_ids = modality_ids_from_input_ids(input_ids, self.token_ids)
            if not self.token_ids:  # no placeholder tokens: every token is text
                self._uniform_modality = 0
        else:
            self.markable = frozenset()
            self.modality_ids = None
        self.attention_mask = kwargs.get("attention_mask")
        self._video_inputs = [kwargs[k] for k in VIDEO_INPUT_KEYWORDS if isinstance(kwargs.get(k), torch.Tensor)]
        if self.routed_layers is None:  # not at every decoding step: a walk over all modules costs ~5% of a step
            self.routed_layers = [m for m in model.modules() if isinstance(m, RoutedLayer)]
        for layer in self.routed_layers:
            layer.routing_records.clear()
        return kwargs

    @contextmanager
    def tower_hooks(self, model: nn.Module) -> Iterator[None]:
        """For the duration of one model call: pre-/post-hooks on the shared media towers that hold adapters, which
        set the modality of what the tower encodes."""
        handles = []
        try:
            for name in sorted(self.shared_towers) if self._video_inputs else ():
                tower = model.get_submodule(name)
                enter = functools.partial(self._enter_tower, name)
                handles.append(tower.register_forward_pre_hook(enter, with_kwargs=True))
                handles.append(tower.register_forward_hook(self._leave_tower))
            yield
        finally:
            for handle in handles:
                handle.remove()
            self._tower_modality = None

    def _enter_tower(self, name: str, tower: nn.Module, args: tuple, kwargs: dict) -> None:
        tensors = [*args, *kwargs.values()]
        is_video = any(t is v for t in tensors for v in self._video_inputs)
        self._tower_modality = "video" if is_video else "image"
        if is_video and tower.training and torch.is_grad_enabled() and _checkpoints_inside(tower):
            raise ValueError(
                f"Adapter layers inside the media tower {name!r} take a separate path for video and image inputs, "
                "which gradient checkpointing's recomputation cannot tell apart. Turn gradient checkpointing off "
                f"inside the tower (`for module in model.get_submodule({name!r}).modules(): "
                "module.gradient_checkpointing = False`, with `model` the transformers model), or leave the tower's "
                "modules out of `target_modules`."
            )

    def _leave_tower(self, tower: nn.Module, args: tuple, outputs) -> None:
        self._tower_modality = None

    # -- what layers read ----------------------------------------------------------------------------------------
    def layer_modality_ids(
        self, num_tokens: int, tower_modality: str | None, needed: Iterable[str], device: torch.device, method: str
    ) -> torch.Tensor:
        """`(num_tokens,)` modality id of every token a layer sees: inside a media tower the tower's modality (for a
        shared tower, what it encodes in this call), else the call's per-position ids. `needed` are the non-text
        modalities the layer tells apart; a clear error when the call cannot mark them."""
        if tower_modality is not None:
            modality = self._tower_modality or tower_modality
            return torch.full((num_tokens,), modality_index(modality), device=device)
        unmarkable = sorted(set(needed) - {"text"} - self.markable)
        if self.modality_ids is not None and unmarkable:
            raise ValueError(
                f"{method} needs to tell {unmarkable} tokens apart, but this model's config has no placeholder token "
                f"id for them (looked for e.g. `{unmarkable[0]}_token_id` / `{unmarkable[0]}_token_index`). Pass an "
                "explicit `modality_ids` tensor of shape (batch, seq) to the model's forward/generate (values index "
                f"{list(MODALITIES)})."
            )
        if self.modality_ids is None or self.modality_ids.numel() != num_tokens:
            raise ValueError(
                f"{method} needs the modality of each of the {num_tokens} tokens of this layer, but it is unknown for "
                "this call: pass `input_ids` (with the model's placeholder tokens) or an explicit integer "
                "`modality_ids` tensor of shape (batch, seq) to the model's forward/generate."
            )
        return self.modality_ids.reshape(-1).to(device)

    def uniform_modality(self, num_tokens: int, tower_modality: str | None, needed: frozenset[str]) -> int | None:
        """The modality id shared by all `num_tokens` tokens a layer sees (e.g. every decoding step of `generate`:
        all text), or None when they differ or it is not known for free: the ids are read back only from CPU tensors
        (once per call), never from an accelerator (that would wait for it). Also None where
        `layer_modality_ids` would refuse the call (it then raises its error). `needed` as there, without "text"."""
        if tower_modality is not None:
            return MODALITIES.index(self._tower_modality or tower_modality)
        ids = self.modality_ids
        if ids is None or ids.numel() != num_tokens or not needed <= self.markable:
            return None
        if self._uniform_modality == _UNKNOWN:
            self._uniform_modality = None
            if ids.device.type == "cpu" and ids.numel():
                first = int(ids.reshape(-1)[0])
                self._uniform_modality = first if bool((ids == first).all()) else None
        return self._uniform_modality

    def token_attention_mask(self, num_tokens: int) -> torch.Tensor | None:
        """Flattened `(num_tokens,)` bool mask of non-padding tokens, or None when unknown / not matching."""
        mask = self.attention_mask
        if mask is None or mask.dim() != 2 or mask.numel() != num_tokens:
            return None
        return mask.reshape(-1).bool()


@contextmanager
def call_scope(model: nn.Module) -> Iterator[None]:
    """For the duration of one `PeftModel` call: record every call of `model` (the transformers model; several in
    `generate`), hook its shared media towers during each call, and add the router aux loss to its outputs. Entered
    by the tuners' `_enable_peft_forward_hooks`."""
    inputs = model.__dict__.get(_ATTRIBUTE)
    if inputs is None or inputs._scope_depth:
        yield
        return
    towers = ExitStack()

    def before(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        kwargs = inputs.record_call(module, args, kwargs)
        towers.close()
        towers.enter_context(inputs.tower_hooks(module))
        return args, kwargs

    def after(module: nn.Module, args: tuple, kwargs: dict, outputs):
        towers.close()
        return add_router_aux_loss(inputs.routed_layers, kwargs, outputs)

    handles = [
        model.register_forward_pre_hook(before, with_kwargs=True),
        model.register_forward_hook(after, with_kwargs=True),
    ]
    inputs._scope_depth += 1
    try:
        yield
    finally:
        inputs._scope_depth -= 1
        for handle in handles:
            handle.remove()
        towers.close()


def _checkpoints_inside(module: nn.Module) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) for m in module.modules())


def _add_call_keywords_to_forward(model: nn.Module) -> None:
    """Give `model` an instance `forward` whose signature shows `modality_ids` and `task`, and which records a call
    made without a PEFT wrapper (adapters loaded with transformers' `load_adapter`)."""
    class_forward = type(model).forward
    signature = inspect.signature(class_forward)
    parameters = list(signature.parameters.values())
    position = next((i for i, p in enumerate(parameters) if p.kind is inspect.Parameter.VAR_KEYWORD), len(parameters))
    for name in reversed(CALL_KEYWORDS):
        if name not in signature.parameters:
            parameters.insert(position, inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None))

    def forward(self, *args, **kwargs):
        inputs = self.__dict__[_ATTRIBUTE]
        if inputs._scope_depth:  # inside call_scope: its pre-hook recorded the call and took our keywords
            return class_forward(self, *args, **kwargs)
        kwargs = inputs.record_call(self, args, kwargs)
        with inputs.tower_hooks(self):
            outputs = class_forward(self, *args, **kwargs)
        return add_router_aux_loss(inputs.routed_layers, kwargs, outputs)

    forward.__signature__ = signature.replace(parameters=parameters)
    forward.__doc__ = class_forward.__doc__
    # A method bound to the instance: `copy.deepcopy` rebinds it to the copy, and it closes over nothing else.
    model.forward = types.MethodType(forward, model)
