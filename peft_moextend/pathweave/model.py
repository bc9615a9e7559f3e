"""PathWeave tuner: uni-modal adapters on target linears, extended modality by modality."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from peft.tuners.tuners_utils import _filter_state_dict_by_key_prefixes, _get_tuner_state_dict_key_prefixes
from torch import nn

from ..modality import validate_modalities
from ..registration import METHODS, ExpertPeftType
from ..tuner_utils import ExpertTuner
from .config import PathWeaveConfig
from .layer import PathWeaveLayer


class PathWeaveModel(ExpertTuner):
    """Adapter-in-adapter modality extension (PathWeave) on the linear layers of a transformers model.

    `get_peft_model(model, PathWeaveConfig(modalities=["image"]))` creates the first modality's adapters;
    `model.base_model.add_modality("audio")` adds the next stage (earlier stages freeze). Tokens use the path of
    their modality (shared modality masks); text tokens keep the base computation.
    """

    prefix: str = METHODS[ExpertPeftType.PATHWEAVE].prefix
    tuner_layer_cls = PathWeaveLayer
    method_name = METHODS[ExpertPeftType.PATHWEAVE].name
    merge_refusal = "each modality's tokens take their own gated path, so no single weight update equals the adapter."

    def _create_and_replace(
        self,
        peft_config: PathWeaveConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        layer = target
        if not isinstance(target, PathWeaveLayer):
            layer = PathWeaveLayer(target, current_key, self.call_inputs)
            self._install_layer(parent, target_name, target, layer, adapter_name)
        for modality in peft_config.modalities:
            layer.add_modality(adapter_name, modality, peft_config)

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """An adapter saved before the noisy gate existed has no `pathweave_noise_k`: with `noisy_gate` (the
        default) it loads with `W_noise = 0`, the noise matrices' initial value, so eval outputs are unchanged."""
        if config.noisy_gate and not any(".pathweave_noise_" in key for key in state_dict):
            prefixes = _get_tuner_state_dict_key_prefixes(model, adapter_name=adapter_name)
            expected = _filter_state_dict_by_key_prefixes(model.state_dict(), prefixes)
            zeros = {
                cls._remove_adapter_name_from_key(key, adapter_name): torch.zeros(value.shape, dtype=value.dtype)
                for key, value in expected.items()
                if ".pathweave_noise_" in key
            }
            if zeros:
                warnings.warn(
                    f"The PathWeave adapter {adapter_name!r} was saved without the noisy gate's noise matrices "
                    "(before `noisy_gate` existed): they start at zero, their initial value, so eval outputs are "
                    "unchanged; training from here adds the gate noise. Set `noisy_gate: false` in its "
                    "adapter_config.json to keep training with the plain softmax gate.",
                    stacklevel=2,
                )
                state_dict = {**state_dict, **zeros}
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)

    def add_modality(self, modality: str, adapter_name: str | None = None) -> dict:
        """Add the next modality stage; returns `{"trainable": n, "fraction_of_base": f}` for the new stage."""
        adapter_name = adapter_name or self.active_adapters[0]
        config = self.peft_config[adapter_name]
        validate_modalities([modality], "modality")
        if modality in config.modalities:
            raise ValueError(f"Modality {modality!r} was already added (modalities so far: {config.modalities}).")
        config.modalities.append(modality)
        for layer in self._layers():
            if adapter_name in layer.pathweave_modalities:
                layer.add_modality(adapter_name, modality, config)
        self._cast_new_stage(adapter_name)
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        base = sum(p.numel() for n, p in self.model.named_parameters() if self.prefix not in n)
        return {"trainable": trainable, "fraction_of_base": trainable / base}
