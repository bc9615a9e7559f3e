"""SMoLA tuner: wraps the target linear layers in `SMoLALayer`."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..registration import METHODS, ExpertPeftType
from ..tuner_utils import ExpertTuner
from .config import SMoLAConfig
from .layer import SMoLALayer


class SMoLAModel(ExpertTuner):
    """Soft mixtures of low-rank experts with per-modality groups on the linear layers of a transformers model.

    Use through `peft.get_peft_model(model, SMoLAConfig(...))` after `import peft_moextend`. Token modalities come
    from the model's placeholder tokens or an explicit `modality_ids` keyword of forward/generate (see
    `peft_moextend.call_inputs`); modules inside a vision/audio tower treat all their tokens as that modality.
    """

    prefix: str = METHODS[ExpertPeftType.SMOLA].prefix
    tuner_layer_cls = SMoLALayer
    method_name = METHODS[ExpertPeftType.SMOLA].name
    merge_refusal = (
        "the mixture weights depend on each token (router and modality groups), so no single weight update equals "
        "the adapter."
    )

    def _create_and_replace(
        self,
        peft_config: SMoLAConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        if isinstance(target, SMoLALayer):
            target.update_layer(adapter_name, peft_config)
            return
        new_module = SMoLALayer(target, current_key, self.call_inputs)
        new_module.update_layer(adapter_name, peft_config)
        self._install_layer(parent, target_name, target, new_module, adapter_name)
