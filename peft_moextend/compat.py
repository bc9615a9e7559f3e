"""What this package needs from the libraries around it, checked where it matters, with errors that name the
version.

The package declares only lower bounds. Two kinds of incompatibility are handled here instead of by upper bounds
that would hold back every user:
- PEFT internals this package builds on (state-dict filtering and remapping of `BaseTuner`): checked once at import.
- Known upstream breaks of one model family in a transformers release (reproduced with plain transformers, no
  adapter): the affected family gets a clear error naming the release; every other family keeps working.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import peft
import peft.tuners.tuners_utils as peft_tuners_utils
import transformers
from packaging.version import Version
from torch import nn

TESTED_PEFT = "0.21"
"""The PEFT release line this version of peft-moextend was tested with."""

_PEFT_FUNCTIONS = ("_filter_state_dict_by_key_prefixes", "_get_tuner_state_dict_key_prefixes")
_PEFT_TUNER_METHODS = ("_get_adapter_state_dict", "_remap_adapter_state_dict_for_load", "_cast_adapter_dtype")


def check_peft_internals() -> None:
    """Raise an ImportError naming the PEFT version and what is missing if PEFT lacks an internal we build on."""
    missing = [name for name in _PEFT_FUNCTIONS if not hasattr(peft_tuners_utils, name)]
    missing += [f"BaseTuner.{name}" for name in _PEFT_TUNER_METHODS if not hasattr(peft_tuners_utils.BaseTuner, name)]
    if missing:
        raise ImportError(
            f"peft-moextend builds on PEFT internals that peft {peft.__version__} does not have: {missing}. It was "
            f"tested with peft {TESTED_PEFT}.x: install `pip install 'peft=={TESTED_PEFT}.*'`, or a peft-moextend "
            "release made for your PEFT version."
        )


def _is_llava_on_moe(model: nn.Module) -> bool:
    text_config = getattr(getattr(model, "config", None), "text_config", None)
    return type(model).__name__ == "LlavaForConditionalGeneration" and any(
        getattr(text_config, name, None) for name in ("num_local_experts", "num_experts")
    )


@dataclass(frozen=True)
class UpstreamBreak:
    """A transformers release range in which a model family fails without any adapter."""

    family: str
    applies_to: Callable[[nn.Module], bool]
    since: str
    what: str
    on_call: Callable[[dict], bool] | None = None  # None: every use; else only calls whose kwargs match
    fixed_in: str | None = None  # first fixed release, once one is known

    def affects(self, version: Version) -> bool:
        return version >= Version(self.since) and (self.fixed_in is None or version < Version(self.fixed_in))

    def message(self, version: Version) -> str:
        if self.fixed_in is None:
            remedy = f"Use transformers<{self.since} for this family: `pip install 'transformers<{self.since}'`."
        else:
            remedy = (
                f"Use transformers>={self.fixed_in} for this family: `pip install -U 'transformers>={self.fixed_in}'`."
            )
        return (
            f"transformers {version} breaks {self.family} upstream ({self.what}; it fails without any adapter too). "
            f"{remedy} Other model families work with this release."
        )


UPSTREAM_BREAKS: tuple[UpstreamBreak, ...] = (
    UpstreamBreak(
        family="Llama 4 (Llama4ForConditionalGeneration)",
        applies_to=lambda model: type(model).__name__ == "Llama4ForConditionalGeneration",
        since="5.24.0",
        what="its forward raises \"'MoeCausalLMOutputWithPast' object has no attribute 'image_outputs'\"",
    ),
    UpstreamBreak(
        family="LLaVA on a mixture-of-experts language model",
        applies_to=_is_llava_on_moe,
        since="5.24.0",
        what='`output_router_logits=True` raises "LlavaModelOutputWithPast got an unexpected keyword argument '
        "'router_logits'\"",
        on_call=lambda kwargs: bool(kwargs.get("output_router_logits")),
    ),
)


def transformers_version() -> Version:
    return Version(transformers.__version__)


def known_upstream_break(model: nn.Module, call_kwargs: dict | None = None) -> str | None:
    """The error message of a known upstream break that hits `model` (for a whole-family break), or this call of it
    (`call_kwargs`), with the installed transformers; None if there is none."""
    version = transformers_version()
    for broken in UPSTREAM_BREAKS:
        if not broken.affects(version) or not broken.applies_to(model):
            continue
        if broken.on_call is None or (call_kwargs is not None and broken.on_call(call_kwargs)):
            return broken.message(version)
    return None


def check_model_supported(model: nn.Module) -> None:
    """Raise a clear error if the installed transformers breaks `model`'s family upstream."""
    message = known_upstream_break(model)
    if message is not None:
        raise RuntimeError(message)


def check_call_supported(model: nn.Module, call_kwargs: dict) -> None:
    """Raise a clear error if the installed transformers breaks this call of `model` upstream."""
    if not call_kwargs.get("output_router_logits"):  # the only per-call break known
        return
    message = known_upstream_break(model, call_kwargs)
    if message is not None:
        raise RuntimeError(message)
