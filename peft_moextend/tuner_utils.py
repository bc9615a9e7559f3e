"""What every tuner of this package shares on top of PEFT's `BaseTuner`."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from peft.config import PeftConfig
from peft.tuners.tuners_utils import (
    BaseTuner,
    BaseTunerLayer,
    _filter_state_dict_by_key_prefixes,
    _get_tuner_state_dict_key_prefixes,
)
from torch import nn

from .call_inputs import CallInputs, call_scope
from .compat import check_model_supported
from .expert_quantization import quantize_experts_like_the_base
from .modality import media_tower
from .quantization import linear_features, protect_cpu_4bit_layers
from .targets import default_language_model_targets


class ExpertTuner(BaseTuner):
    """Base of our tuners: per-call inputs, quantized-layer protection, PEFT's adapter dtype convention, and a clear
    refusal to merge.

    Subclasses set `prefix`, `tuner_layer_cls`, `method_name` and `merge_refusal` (why the method cannot be
    merged into the base weights).
    """

    method_name: str
    merge_refusal: str
    target_module_mapping: dict[str, list[str]] = {}

    def _pre_injection_hook(self, model: nn.Module, config: PeftConfig, adapter_name: str) -> None:
        check_model_supported(model)
        self.call_inputs = CallInputs.attach(model)
        protect_cpu_4bit_layers(model)
        quantize_experts_like_the_base(model)

    @contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs) -> Iterator[None]:
        """PEFT enters this around every `PeftModel.forward` / `generate` call: the call's inputs reach the layers
        through hooks that exist for the duration of the call (see `peft_moextend.call_inputs`)."""
        with call_scope(self.model):
            yield

    def _unload_and_optionally_merge(self, *args, **kwargs) -> nn.Module:
        model = super()._unload_and_optionally_merge(*args, **kwargs)
        CallInputs.detach(model)
        return model

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        if not self.peft_config:  # the last adapter: the model's forward is the class's own again
            CallInputs.detach(self.model)

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """PEFT's convention (adapters are created in the base layer's dtype; `autocast_adapter_dtype=True` upcasts
        float16/bfloat16 ones to float32), remembered per adapter for the tensors later stages add. PEFT's cast
        re-creates the parameters: their `requires_grad` (frozen earlier stages) is kept."""
        self._autocast_adapter_dtype = {
            **getattr(self, "_autocast_adapter_dtype", {}),
            adapter_name: autocast_adapter_dtype,
        }
        flags = {name: p.requires_grad for name, p in self.model.named_parameters() if self.prefix in name}
        super()._cast_adapter_dtype(adapter_name, autocast_adapter_dtype)
        for name, p in self.model.named_parameters():
            if name in flags:
                p.requires_grad_(flags[name])

    def _cast_new_stage(self, adapter_name: str) -> None:
        """Apply the adapter's dtype convention to tensors a later stage (task, modality) just added."""
        self._cast_adapter_dtype(adapter_name, getattr(self, "_autocast_adapter_dtype", {}).get(adapter_name, True))

    def _prepare_adapter_config(self, peft_config: PeftConfig, model_config: dict) -> PeftConfig:
        # Targets are resolved from the model itself in `_prepare_model`.
        return peft_config

    def _prepare_model(self, peft_config: PeftConfig, model: nn.Module) -> None:
        if peft_config.target_modules is None:
            peft_config.target_modules = self._default_target_modules(model)

    def _check_target_module_exists(self, peft_config: PeftConfig, key: str):
        # bitsandbytes' 4-bit storage of fused expert tensors (`experts.parametrizations.down_proj`) is no layer
        if ".parametrizations." in f".{key}.":
            return False
        return super()._check_target_module_exists(peft_config, key)

    def _default_target_modules(self, model: nn.Module) -> str:
        """`target_modules` when the config leaves it None: the language model's projections."""
        return default_language_model_targets(model)

    def _check_merge_allowed(self) -> None:
        raise ValueError(
            f"{self.method_name} adapters cannot be merged into the base weights: {self.merge_refusal} Keep the "
            "PeftModel (or `save_pretrained` the adapter) instead of calling merge/merge_and_unload."
        )

    def merge_adapter(self, *args, **kwargs) -> None:
        self._check_merge_allowed()

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        to_save = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        broken = [key for key, value in to_save.items() if value.is_floating_point() and not value.isfinite().all()]
        if broken:
            raise ValueError(
                f"Refusing to save adapter {adapter_name!r}: {len(broken)} tensors contain NaN or inf (first: "
                f"{broken[0]}), so training diverged (check the learning rate, the inputs and the loss scale). "
                "The previously saved checkpoint, if any, is left untouched."
            )
        return to_save

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        prefixes = _get_tuner_state_dict_key_prefixes(model, adapter_name=adapter_name)
        expected = _filter_state_dict_by_key_prefixes(model.state_dict(), prefixes)
        loaded = {k: v for k, v in remapped.items() if cls.prefix in k}
        missing = sorted(set(expected) - set(loaded))
        unexpected = sorted(set(loaded) - set(expected))
        mismatched = [k for k in set(loaded) & set(expected) if tuple(loaded[k].shape) != tuple(expected[k].shape)]
        if missing or unexpected or mismatched:
            details = []
            if mismatched:
                key = sorted(mismatched)[0]
                details.append(
                    f"{len(mismatched)} tensors have other shapes (e.g. {key}: {tuple(loaded[key].shape)} in the "
                    f"adapter, {tuple(expected[key].shape)} in this model)"
                )
            if unexpected:
                details.append(f"{len(unexpected)} adapter tensors have no place in this model (e.g. {unexpected[0]})")
            if missing:
                details.append(f"{len(missing)} tensors this model expects are not in the adapter (e.g. {missing[0]})")
            raise ValueError(
                f"This {cls.method_name} adapter does not fit this base model: {'; '.join(details)}. The adapter "
                "was trained on a base model with another architecture (hidden size, number of layers or experts): "
                f"load it onto the base named in adapter_config.json ({config.base_model_name_or_path!r})."
            )
        return remapped

    def _install_layer(
        self, parent: nn.Module, target_name: str, target: nn.Module, new_module: nn.Module, adapter_name: str
    ) -> None:
        """Put a freshly created tuner layer in place of `target`; an adapter added while another is active starts
        frozen, as in PEFT's own tuners."""
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _layers(self) -> list[nn.Module]:
        return [m for m in self.model.modules() if isinstance(m, self.tuner_layer_cls)]

    @contextmanager
    def _disabled_adapters(self) -> Iterator[None]:
        self._enable_adapter_layers(False)
        try:
            yield
        finally:
            self._enable_adapter_layers(True)


def as_dtype(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`tensor` in `dtype`, without dispatching a no-op cast when it already is (decoding steps of small models are
    bound by dispatched operators)."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


class LinearExpertLayer(nn.Module, BaseTunerLayer):
    """Shared base of our tuner layers around a linear `base_layer` (nn.Linear or a quantized linear PEFT knows).

    It knows its module name, its features, its media tower (None in the language model) and the model's
    `CallInputs`; subclasses create their tensors on CPU in float32 and call `place_adapter`.
    """

    method_name: str

    def __init__(self, base_layer: nn.Module, module_name: str, call_inputs: CallInputs) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.module_name = module_name
        self.in_features, self.out_features = linear_features(base_layer, module_name, self.method_name)
        tower = media_tower(module_name)
        self.tower_modality = None if tower is None else tower[1]
        if tower is not None:
            call_inputs.register_tower(*tower)
        self.call_inputs = call_inputs
        self._disable_adapters = False
        self.merged_adapters = []

    def place_adapter(self, adapter_name: str) -> None:
        """Move the adapter's tensors to the base layer's device and (floating) dtype, as PEFT's LoRA does; tensors
        on the meta device (`low_cpu_mem_usage=True`) stay there until the weights are loaded."""
        self._move_adapter_to_device_of_base_layer(adapter_name)

    def modality_ids(self, num_tokens: int, needed: Iterable[str], device: torch.device) -> torch.Tensor:
        """`(num_tokens,)` modality id of every token this layer sees (see `CallInputs.layer_modality_ids`)."""
        return self.call_inputs.layer_modality_ids(num_tokens, self.tower_modality, needed, device, self.method_name)

    def inference_modality(self, num_tokens: int, needed: frozenset[str] | None) -> int | None:
        """The modality id all `num_tokens` tokens of this call share, when the layer may take its inference fast
        path: eval mode and no autograd (no dropout, nothing to record for training) and one
        modality known for free (`CallInputs.uniform_modality`; `needed` without "text"); -1 when the layer tells
        no modalities apart (`needed` None). Else None: the general path."""
        if self.training or torch.is_grad_enabled():
            return None
        if needed is None:
            return -1
        return self.call_inputs.uniform_modality(num_tokens, self.tower_modality, needed)


class StagedParameters:
    """Per-adapter tensors of a tuner layer that grows by stages (CMoE tasks, PathWeave modalities): stage k's tensor
    of kind `kind` lives in the `nn.ParameterDict` `<stage_prefix><kind>_<k>` (keyed by adapter name), declared to
    PEFT on first use and frozen once a later stage exists. The one place that knows this naming scheme.

    Subclasses set `stage_prefix` (the method's parameter prefix) and call `init_stages()` in `__init__`.
    """

    stage_prefix: str

    def init_stages(self) -> None:
        """Per instance: the containers are declared as stages are added (`adapter_layer_names` grows with them)."""
        self.adapter_layer_names: tuple[str, ...] = ()
        self.frozen_peft_weight_names: dict[str, tuple[str, ...]] = {}

    def stage_name(self, kind: str, k: int) -> str:
        return f"{self.stage_prefix}{kind}_{k}"

    def add_stage(self, kind: str, k: int, trainable: bool = True) -> nn.ParameterDict:
        """Stage k's container of `kind`, created on first use: declared in `adapter_layer_names` if it trains,
        else in `other_param_names` (saved with the adapter, never trained by backprop)."""
        name = self.stage_name(kind, k)
        if not hasattr(self, name):
            self.add_module(name, nn.ParameterDict())
            if trainable:
                self.adapter_layer_names = (*self.adapter_layer_names, name)
            else:
                self.other_param_names = (*self.other_param_names, name)
        return getattr(self, name)

    def stage(self, kind: str, k: int, adapter_name: str) -> torch.Tensor | None:
        """Stage k's tensor of `kind` for `adapter_name`, or None if that stage has none."""
        container = getattr(self, self.stage_name(kind, k), None)
        return container[adapter_name] if container is not None and adapter_name in container else None

    def stages(self, kind: str, upto: int, adapter_name: str) -> list[torch.Tensor]:
        """The tensors of `kind` of stages `0 .. upto - 1` that have one."""
        found = (self.stage(kind, k, adapter_name) for k in range(upto))
        return [t for t in found if t is not None]

    def drop_stage(self, kinds: Iterable[str], k: int, adapter_name: str) -> None:
        """Remove stage k's tensors of `kinds` for `adapter_name` (the containers stay declared)."""
        for kind in kinds:
            container = getattr(self, self.stage_name(kind, k), None)
            if container is not None and adapter_name in container:
                del container[adapter_name]

    def freeze_before(self, adapter_name: str, k: int, kinds: Iterable[str]) -> None:
        """Stages `< k` of `kinds` stay frozen for `adapter_name`, whatever `set_adapter` does later (PEFT reads
        `frozen_peft_weight_names` after every switch)."""
        kinds = tuple(kinds)
        names = tuple(self.stage_name(kind, j) for j in range(k) for kind in kinds)
        self.frozen_peft_weight_names[adapter_name] = names
