"""ModeX tuner: serial modality-expert adapters after target linears, optional affines after norm layers."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..registration import METHODS, ExpertPeftType
from ..targets import default_language_model_targets
from ..tuner_utils import ExpertTuner
from .config import ModeXConfig
from .layer import ModeXLayer, ModeXNormLayer

ADAPTED_OUTPUTS = ("o_proj", "down_proj")


def _is_norm(module: nn.Module) -> bool:
    name = type(module).__name__
    return name.endswith(("LayerNorm", "RMSNorm")) or isinstance(module, nn.LayerNorm)


class ModeXModel(ExpertTuner):
    """Modality-expert coordinated serial adapters (ModeX) on a transformers model.

    Use through `peft.get_peft_model(model, ModeXConfig(...))` after `import peft_moextend`. Token modalities come
    from the placeholder tokens or an explicit `modality_ids` (see `peft_moextend.call_inputs`).
    """

    prefix: str = METHODS[ExpertPeftType.MODEX].prefix
    tuner_layer_cls = (ModeXLayer, ModeXNormLayer)
    method_name = METHODS[ExpertPeftType.MODEX].name
    merge_refusal = "the serial adapter is non-linear (ReLU bottleneck, per-token coordinator weights)."

    def _default_target_modules(self, model: nn.Module) -> str:
        return default_language_model_targets(model, ADAPTED_OUTPUTS)

    def _prepare_model(self, peft_config: ModeXConfig, model: nn.Module) -> None:
        super()._prepare_model(peft_config, model)
        if peft_config.train_layer_norms:
            self._norm_targets = self._norms_next_to_targets(peft_config, model)
        else:
            self._norm_targets = set()

    def _norms_next_to_targets(self, config: ModeXConfig, model: nn.Module) -> set[str]:
        """Norm layers inside the blocks (decoder layers) that hold a target linear, plus the final norm."""
        targets = [n for n, _ in model.named_modules() if self._check_target_module_exists(config, n)]
        blocks = {t.rsplit(".", 2)[0] for t in targets}
        parents = {t.rsplit(".", 4)[0] for t in targets}
        return {
            name
            for name, module in model.named_modules()
            if _is_norm(module)
            and hasattr(module, "weight")
            and (name.rsplit(".", 1)[0] in blocks or name.rsplit(".", 1)[0] in parents)
        }

    def _check_target_module_exists(self, peft_config: ModeXConfig, key: str):
        return key in getattr(self, "_norm_targets", ()) or super()._check_target_module_exists(peft_config, key)

    def _create_and_replace(
        self,
        peft_config: ModeXConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        if isinstance(target, (ModeXLayer, ModeXNormLayer)):
            target.update_layer(adapter_name, peft_config)
            return
        if _is_norm(target):
            layer = ModeXNormLayer(target, target.weight.shape[0])
        else:
            layer = ModeXLayer(target, current_key, self.call_inputs)
        layer.update_layer(adapter_name, peft_config)
        self._install_layer(parent, target_name, target, layer, adapter_name)
