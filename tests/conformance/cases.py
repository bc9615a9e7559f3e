"""Per-method fixtures of the conformance suite: every registered method must have one (see test_registry.py).

A case says which model families the method supports, how to build its configs (a default one, and a different one
for a second adapter), which families represent "a text causal LM" and "a vision-language model", and how to draw
config options for property-based tests together with an independent oracle of which combinations are valid.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from hypothesis import strategies as st
from peft.config import PeftConfig
from tiny_models import MOE_FAMILIES, make_inputs, make_tiny_moe
from tiny_vlms import AUDIO_FAMILIES, VLM_FAMILIES, make_tiny_vlm, make_vlm_inputs
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel

from peft_moextend import METHODS, CMoEConfig, ExpertPeftType, ModeXConfig, MoExtendConfig, PathWeaveConfig, SMoLAConfig


def make_llama(seed: int = 0) -> PreTrainedModel:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM._from_config(config, attn_implementation="eager", dtype=torch.float32).eval()


def make_model(family: str, seed: int = 0) -> PreTrainedModel:
    if family == "llama":
        return make_llama(seed)
    if family in MOE_FAMILIES:
        return make_tiny_moe(family, seed=seed)
    return make_tiny_vlm(family, seed=seed)


def make_batch(model: PreTrainedModel, family: str, batch_size: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    if family == "llama":
        input_ids = torch.randint(3, 128, (batch_size, 12), generator=torch.Generator().manual_seed(seed))
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}
    if family in MOE_FAMILIES:
        return make_inputs(model, family, batch_size=batch_size, seed=seed)
    return make_vlm_inputs(model, family, batch_size=batch_size, seed=seed)


def make_mixed_batch(model: PreTrainedModel, family: str) -> tuple[dict, list[dict]]:
    """A batch of two samples of equal length that mixes modalities where the family has media (sample 0 with an
    image or audio clip, sample 1 text only), and each sample as a batch of its own."""
    first = make_batch(model, family, batch_size=1, seed=1)
    length = first["input_ids"].shape[1]
    if family == "llama":
        second = make_batch(model, family, batch_size=1, seed=2)
        second = {k: v[:, :length] for k, v in second.items()}
    elif family in MOE_FAMILIES:
        second = make_inputs(model, family, batch_size=1, seq_len=length, with_image=False, seed=2)
    else:
        second = make_vlm_inputs(model, family, batch_size=1, seq_len=length, with_media=False, seed=2)
    sequence_keys = ("input_ids", "attention_mask", "labels")
    mixed = {k: torch.cat([first[k], second[k]]) for k in sequence_keys}
    mixed |= {k: v for k, v in first.items() if k not in sequence_keys}  # the media of sample 0
    return mixed, [first, second]


def perturb_adapter(model, prefix: str, scale: float = 0.1) -> None:
    """Deterministic noise on every adapter tensor: zero-initialised parts become non-zero, ties are broken."""
    with torch.no_grad():
        for index, (name, p) in enumerate(sorted(model.named_parameters())):
            if prefix in name:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(index)).to(p.device) * scale)


def is_vision_language(family: str) -> bool:
    return family in VLM_FAMILIES or family in ("qwen3_vl_moe", "llama4", "llava_mixtral")


@dataclass(frozen=True)
class MethodCase:
    """How the conformance suite exercises one method."""

    name: str
    peft_type: ExpertPeftType
    families: tuple[str, ...]
    text_family: str
    vision_family: str
    make_config: Callable[[str, int], PeftConfig]  # (family, variant) -> config; variant 1 differs from 0
    has_router_aux_loss: bool
    options: st.SearchStrategy  # dicts of config options, valid or not
    is_valid: Callable[[dict], bool]  # independent oracle: does the config accept `options`?
    fits_text_model: Callable[[dict], bool] = lambda options: True  # ... and does it then fit the text family?
    # a config for the text family whose layers tell image tokens apart (which a text model cannot mark without an
    # explicit `modality_ids`); None if the method has no modality-specific part
    make_image_config: Callable[[], PeftConfig] | None = None
    # prepares a model built with config variant 0 for a batch whose two samples take different paths (CMoE: a
    # second task) and returns the per-sample call keywords
    split_samples: Callable[[object], list[dict]] = lambda peft_model: [{}, {}]

    @property
    def prefix(self) -> str:
        return METHODS[self.peft_type].prefix

    def __str__(self) -> str:
        return self.name


def _moextend_config(family: str, variant: int) -> MoExtendConfig:
    if variant == 0:
        return MoExtendConfig(num_new_experts=1, router_aux_loss_coef=1e-2)
    return MoExtendConfig(num_new_experts=2, expert_init=1, calibration=False)


def _moextend_valid(options: dict) -> bool:
    layers = options.get("target_layers")
    return (
        options.get("num_new_experts", 1) >= 1
        and (layers is None or (len(layers) > 0 and all(i >= 0 for i in layers)))
        and (not isinstance(options.get("expert_init"), int) or options["expert_init"] >= 0)
        and options.get("router_aux_loss_coef", 0.0) >= 0
        and options.get("calibration_hidden_size", 16) >= 1
        and options.get("restrict_to_modalities", None) != []
        and set(options.get("restrict_to_modalities") or ()) <= {"text", "image", "video", "audio"}
    )


def _moextend_fits_tiny_mixtral(options: dict) -> bool:
    """The tiny Mixtral has MoE layers 0 and 1 with 4 experts each."""
    layers = options.get("target_layers") or []
    return all(i < 2 for i in layers) and (
        not isinstance(options.get("expert_init"), int) or options["expert_init"] < 4
    )


_MOEXTEND_OPTIONS = st.fixed_dictionaries(
    {},
    optional={
        "num_new_experts": st.integers(-1, 3),
        "target_layers": st.none() | st.lists(st.integers(-1, 3), max_size=3),
        "expert_init": st.sampled_from(["expert_0_until_measured", "zeros"]) | st.integers(-1, 5),
        "calibration": st.booleans(),
        "calibration_hidden_size": st.integers(0, 8),
        "router_aux_loss_coef": st.floats(-1.0, 1.0, allow_nan=False),
        "restrict_to_modalities": st.none() | st.lists(st.sampled_from(["text", "image", "smell"]), max_size=2),
    },
)


def _smola_groups(family: str) -> dict[str, int]:
    if family == "llama" or family in MOE_FAMILIES and not is_vision_language(family):
        return {"multimodal": 3}
    return {"text": 2, "audio" if family in AUDIO_FAMILIES else "image": 2, "multimodal": 2}


def _smola_config(family: str, variant: int) -> SMoLAConfig:
    if variant == 0:
        return SMoLAConfig(r=2, expert_groups=_smola_groups(family), router="top_k", top_k=1, router_aux_loss_coef=1e-2)
    return SMoLAConfig(r=3, expert_groups={"multimodal": 2}, lora_alpha=3)


def _smola_valid(options: dict) -> bool:
    groups = options.get("expert_groups", {"text": 4, "image": 4, "multimodal": 4})
    router = options.get("router", "soft")
    return (
        options.get("r", 4) > 0
        and bool(groups)
        and set(groups) <= {"text", "image", "video", "audio", "multimodal"}
        and all(n >= 1 for n in groups.values())
        and router in ("soft", "top_k")
        and (router == "soft" or 1 <= options.get("top_k", 2) <= min(groups.values(), default=0))
        and options.get("router_temperature", 1.0) >= 1e-3
        and 0 <= options.get("dropout", 0.0) < 1
        and options.get("router_aux_loss_coef", 1e-3) >= 0
    )


_SMOLA_OPTIONS = st.fixed_dictionaries(
    {},
    optional={
        "r": st.integers(-1, 4),
        "expert_groups": st.dictionaries(
            st.sampled_from(["text", "multimodal", "video", "smell"]), st.integers(0, 3), max_size=3
        ),
        "router": st.sampled_from(["soft", "top_k", "hard"]),
        "top_k": st.integers(0, 3),
        "router_temperature": st.floats(-1.0, 4.0, allow_nan=False),
        "dropout": st.floats(0.0, 1.0),
        "router_aux_loss_coef": st.floats(-1.0, 1.0, allow_nan=False),
    },
)


def _cmoe_config(family: str, variant: int) -> CMoEConfig:
    task = [{"name": "first", "layers": None}]
    if variant == 0:
        return CMoEConfig(r=2, experts_per_task=2, tasks=task)
    return CMoEConfig(r=3, experts_per_task=1, locator="gaussian", tasks=task)


def _cmoe_two_tasks(peft_model) -> list[dict]:
    peft_model.base_model.add_task("second")
    return [{"task": "first"}, {"task": "second"}]


def _cmoe_valid(options: dict) -> bool:
    return (
        options.get("r", 8) >= 1
        and options.get("experts_per_task", 2) >= 1
        and 0 <= options.get("probe_threshold", 0.0) <= 1
        and options.get("locator", "vae") in ("vae", "gaussian")
        and options.get("locator_latent_size", 16) >= 1
    )


_CMOE_OPTIONS = st.fixed_dictionaries(
    {},
    optional={
        "r": st.integers(-1, 4),
        "experts_per_task": st.integers(0, 3),
        "probe_threshold": st.floats(-0.5, 1.5, allow_nan=False),
        "locator": st.sampled_from(["vae", "gaussian", "knn"]),
        "locator_latent_size": st.integers(0, 8),
        "lora_alpha": st.floats(0.5, 32.0),
    },
)


def _modex_config(family: str, variant: int) -> ModeXConfig:
    if variant == 1:
        return ModeXConfig(bottleneck_size=8, experts={"first": None, "second": None}, train_layer_norms=False)
    if is_vision_language(family):
        return ModeXConfig()
    return ModeXConfig(experts={"text": ["text"], "cross_modal": None})


def _modex_valid(options: dict) -> bool:
    experts = options.get("experts", {"text": ["text"], "cross_modal": None})
    return (
        options.get("bottleneck_size", 16) >= 1
        and options.get("router_temperature", 10.0) >= 1e-3
        and bool(experts)
        and all(m is None or (m and set(m) <= {"text", "image", "video", "audio"}) for m in experts.values())
    )


_MODEX_OPTIONS = st.fixed_dictionaries(
    {},
    optional={
        "bottleneck_size": st.integers(-1, 8),
        "router_temperature": st.floats(-1.0, 20.0, allow_nan=False),
        "train_layer_norms": st.booleans(),
        "experts": st.dictionaries(
            st.sampled_from(["text", "visual", "cross"]),
            st.none() | st.lists(st.sampled_from(["text", "image", "smell"]), max_size=2),
            max_size=3,
        ),
    },
)


def _pathweave_config(family: str, variant: int) -> PathWeaveConfig:
    first = "image" if is_vision_language(family) else "text"
    if variant == 0:
        return PathWeaveConfig(r=4, modalities=[first])
    return PathWeaveConfig(r=2, modalities=[first])


def _pathweave_valid(options: dict) -> bool:
    modalities = options.get("modalities", ["image"])
    return (
        options.get("r", 8) >= 1
        and bool(modalities)
        and len(set(modalities)) == len(modalities)
        and set(modalities) <= {"text", "image", "video", "audio"}
        and options.get("noisy_gate", True) in (True, False)
        and (options.get("gate_top_k") is None or options["gate_top_k"] >= 1)
        and options.get("in_adapter_form", "residual") in ("residual", "replace")
    )


_PATHWEAVE_OPTIONS = st.fixed_dictionaries(
    {},
    optional={
        "r": st.integers(-1, 4),
        "modalities": st.lists(st.sampled_from(["text", "image", "smell"]), max_size=3),
        "noisy_gate": st.booleans() | st.just("yes"),
        "gate_top_k": st.none() | st.integers(-1, 3),
        "in_adapter_form": st.sampled_from(["residual", "replace", "mlp"]),
    },
)

CASES: tuple[MethodCase, ...] = (
    MethodCase(
        name="moextend",
        peft_type=ExpertPeftType.MOEXTEND,
        families=MOE_FAMILIES,
        text_family="mixtral",
        vision_family="llava_mixtral",
        make_config=_moextend_config,
        has_router_aux_loss=True,
        options=_MOEXTEND_OPTIONS,
        is_valid=_moextend_valid,
        fits_text_model=_moextend_fits_tiny_mixtral,
        make_image_config=lambda: MoExtendConfig(restrict_to_modalities=["image"]),
    ),
    MethodCase(
        name="smola",
        peft_type=ExpertPeftType.SMOLA,
        families=("llama", *VLM_FAMILIES, "mixtral"),
        text_family="llama",
        vision_family="llava",
        make_config=_smola_config,
        has_router_aux_loss=True,
        options=_SMOLA_OPTIONS,
        is_valid=_smola_valid,
        make_image_config=lambda: SMoLAConfig(r=2, expert_groups={"text": 2, "image": 2}),
    ),
    MethodCase(
        name="cmoe",
        peft_type=ExpertPeftType.CMOE,
        families=("llama", "llava", "qwen2_vl", "mixtral"),
        text_family="llama",
        vision_family="llava",
        make_config=_cmoe_config,
        has_router_aux_loss=False,
        options=_CMOE_OPTIONS,
        is_valid=_cmoe_valid,
        split_samples=_cmoe_two_tasks,
    ),
    MethodCase(
        name="modex",
        peft_type=ExpertPeftType.MODEX,
        families=("llama", "llava", "qwen2_vl", "mixtral"),
        text_family="llama",
        vision_family="llava",
        make_config=_modex_config,
        has_router_aux_loss=False,
        options=_MODEX_OPTIONS,
        is_valid=_modex_valid,
        make_image_config=lambda: ModeXConfig(),
    ),
    MethodCase(
        name="pathweave",
        peft_type=ExpertPeftType.PATHWEAVE,
        families=("llama", "llava", "qwen2_vl", "mixtral"),
        text_family="llama",
        vision_family="llava",
        make_config=_pathweave_config,
        has_router_aux_loss=False,
        options=_PATHWEAVE_OPTIONS,
        is_valid=_pathweave_valid,
        make_image_config=lambda: PathWeaveConfig(r=2, modalities=["image"]),
    ),
)

FAMILY_CASES = [(case, family) for case in CASES for family in case.families]
REPRESENTATIVE_CASES = [(case, family) for case in CASES for family in (case.text_family, case.vision_family)]


def case_id(value) -> str:
    return str(value)
