"""What every tuner of this package shares on top of PEFT's `BaseTuner`."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from .forward_context import ForwardContext
from .quantization import protect_cpu_4bit_layers


class ExpertTuner(BaseTuner):
    """Base of our tuners: per-call context hooks, quantized-layer protection, and a clear refusal to merge.

    Subclasses set `prefix`, `tuner_layer_cls`, `method_name` and `merge_refusal` (why the method cannot be
    merged into the base weights).
    """

    method_name: str
    merge_refusal: str
    target_module_mapping: dict[str, list[str]] = {}

    def _pre_injection_hook(self, model: nn.Module, config: PeftConfig, adapter_name: str) -> None:
        self._forward_context = ForwardContext.of(model)
        protect_cpu_4bit_layers(model)

    def _prepare_adapter_config(self, peft_config: PeftConfig, model_config: dict) -> PeftConfig:
        # Targets are resolved from the model itself in `_prepare_model`.
        return peft_config

    def _check_merge_allowed(self) -> None:
        raise ValueError(
            f"{self.method_name} adapters cannot be merged into the base weights: {self.merge_refusal} Keep the "
            "PeftModel (or `save_pretrained` the adapter) instead of calling merge/merge_and_unload."
        )

    def merge_adapter(self, *args, **kwargs) -> None:
        self._check_merge_allowed()

    def _layers(self) -> list[nn.Module]:
        return [m for m in self.model.modules() if isinstance(m, self.tuner_layer_cls)]

    @contextmanager
    def _disabled_adapters(self) -> Iterator[None]:
        self._enable_adapter_layers(False)
        try:
            yield
        finally:
            self._enable_adapter_layers(True)
