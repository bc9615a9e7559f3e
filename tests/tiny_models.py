"""Tiny, randomly initialised transformers MoE models (built from configs only) for the test-suite.

Every family has 2 decoder layers, all of them MoE layers, 4 routed experts with top-2 routing, hidden size 32,
vocab 128, float32 weights and eager attention. Vision towers have 1 layer, hidden size 32, and each image becomes
4 placeholder tokens in ``input_ids``.

Where the MoE blocks live (N = decoder layer index; every decoder layer holds one):

family         MoE block path                              block class                   router attr: class
-------------  ------------------------------------------  ----------------------------  -------------------------------
mixtral        model.layers.N.mlp                          MixtralSparseMoeBlock         gate: MixtralTopKRouter
qwen2_moe      model.layers.N.mlp                          Qwen2MoeSparseMoeBlock        gate: Qwen2MoeTopKRouter
qwen3_moe      model.layers.N.mlp                          Qwen3MoeSparseMoeBlock        gate: Qwen3MoeTopKRouter
olmoe          model.layers.N.mlp                          OlmoeSparseMoeBlock           gate: OlmoeTopKRouter
qwen3_vl_moe   model.language_model.layers.N.mlp           Qwen3VLMoeTextSparseMoeBlock  gate: Qwen3VLMoeTextTopKRouter
llama4         language_model.model.layers.N.feed_forward  Llama4TextMoe                 router: Llama4Router
llava_mixtral  model.language_model.layers.N.mlp           MixtralSparseMoeBlock         gate: MixtralTopKRouter

- Routed experts are always the block's ``experts`` attribute: ``<Prefix>Experts`` (``Qwen3VLMoeTextExperts``,
  ``Llama4TextExperts``). Shared experts: qwen2_moe ``shared_expert`` (Qwen2MoeMLP) scaled by the sigmoid of
  ``shared_expert_gate`` (nn.Linear(H, 1)); llama4 ``shared_expert`` (Llama4TextMLP), always added.
- Vision towers: qwen3_vl_moe ``model.visual``, llama4 ``vision_model`` (+ ``multi_modal_projector``),
  llava_mixtral ``model.vision_tower`` (CLIPVisionModel) + ``model.multi_modal_projector``.

Layouts (transformers 5.23):
- All routers except Llama4's are plain ``nn.Module``s with a ``weight`` of shape (num_experts, hidden) returning
  ``(router_logits, top_k_weights, top_k_index)``; ``Llama4Router`` subclasses ``nn.Linear`` and returns
  ``(router_scores, router_logits)`` with dense sigmoid scores (0 for unselected experts). Llama4TextMoe runs every
  expert on every token and multiplies the expert *input* (not its output) by that score.
- Llama4ForConditionalGeneration has no ``model`` attribute: ``language_model`` is a full Llama4ForCausalLM (it holds
  ``lm_head``).
- Experts are fused 3D parameters ``gate_up_proj`` / ``down_proj``. Every family but Llama4 decorates its experts
  class with ``@use_experts_implementation`` and stores them as (E, 2*I, H) / (E, H, I); Llama4TextExperts does not
  use the experts interface and stores them transposed: (E, H, 2*I) / (E, I, H), applied with ``torch.bmm``.
"""

from __future__ import annotations

import torch
from transformers import (
    CLIPVisionConfig,
    Llama4Config,
    Llama4ForConditionalGeneration,
    LlavaConfig,
    LlavaForConditionalGeneration,
    MixtralConfig,
    MixtralForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
    PreTrainedConfig,
    PreTrainedModel,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
    Qwen3VLMoeConfig,
    Qwen3VLMoeForConditionalGeneration,
)

MOE_FAMILIES: tuple[str, ...] = (
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "olmoe",
    "qwen3_vl_moe",
    "llama4",
    "llava_mixtral",
)
VISION_FAMILIES: tuple[str, ...] = ("qwen3_vl_moe", "llama4", "llava_mixtral")
# Families whose experts dispatch through transformers' experts interface, i.e. honour `experts_implementation`.
EXPERTS_IMPLEMENTATION_FAMILIES: tuple[str, ...] = tuple(f for f in MOE_FAMILIES if f != "llama4")

NUM_LAYERS = 2
NUM_EXPERTS = 4
TOP_K = 2
VOCAB_SIZE = 128
ROUTER_INIT_STD = 0.5

# Token ids: 0-2 are pad/bos/eos, the top 4 ids are reserved for multimodal special tokens, the rest is plain text.
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
IMAGE_ID, IMAGE_START_ID, IMAGE_END_ID, VIDEO_ID = 127, 126, 125, 124
TEXT_IDS = (3, 124)  # [low, high) range for random text tokens

_TEXT_COMMON = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 32,
    "intermediate_size": 32,
    "num_hidden_layers": NUM_LAYERS,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "max_position_embeddings": 256,
    "num_experts_per_tok": TOP_K,
    "initializer_range": 0.1,
    "tie_word_embeddings": False,
    "pad_token_id": PAD_ID,
    "bos_token_id": BOS_ID,
    "eos_token_id": EOS_ID,
}
# Qwen-style MoE configs: `num_experts`, separate expert width, every layer sparse.
_QWEN_MOE = {"num_experts": NUM_EXPERTS, "moe_intermediate_size": 32, "decoder_sparse_step": 1, "mlp_only_layers": []}

# Qwen3-VL image: a (t, h, w) grid of 4x4-pixel patches; spatial_merge_size 2 merges 2x2 patches into one token.
_QWEN_VL_GRID = (1, 4, 4)


def _mixtral_config() -> MixtralConfig:
    return MixtralConfig(**_TEXT_COMMON, num_local_experts=NUM_EXPERTS)


def _build_config(family: str) -> PreTrainedConfig:
    if family == "mixtral":
        return _mixtral_config()
    if family == "qwen2_moe":
        return Qwen2MoeConfig(**_TEXT_COMMON, **_QWEN_MOE, shared_expert_intermediate_size=32)
    if family == "qwen3_moe":
        return Qwen3MoeConfig(**_TEXT_COMMON, **_QWEN_MOE)
    if family == "olmoe":
        return OlmoeConfig(**_TEXT_COMMON, num_experts=NUM_EXPERTS)
    if family == "qwen3_vl_moe":
        rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}
        return Qwen3VLMoeConfig(
            text_config={**_TEXT_COMMON, **_QWEN_MOE, "rope_parameters": rope},
            vision_config={
                "depth": 1,
                "hidden_size": 32,
                "intermediate_size": 32,
                "num_heads": 2,
                "patch_size": 4,
                "temporal_patch_size": 2,
                "spatial_merge_size": 2,
                "out_hidden_size": 32,
                "num_position_embeddings": 16,
                "deepstack_visual_indexes": [0],
            },
            image_token_id=IMAGE_ID,
            video_token_id=VIDEO_ID,
            vision_start_token_id=IMAGE_START_ID,
            vision_end_token_id=IMAGE_END_ID,
        )
    if family == "llama4":
        return Llama4Config(
            text_config={
                **_TEXT_COMMON,
                "num_local_experts": NUM_EXPERTS,
                "intermediate_size_mlp": 32,
                "moe_layers": list(range(NUM_LAYERS)),
            },
            # 32x32 image, 8x8 patches -> 16 patches; pixel shuffle (ratio 0.5) -> 4 tokens of 4 * 32 = 128 channels.
            vision_config={
                "hidden_size": 32,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "intermediate_size": 128,
                "image_size": 32,
                "patch_size": 8,
                "pixel_shuffle_ratio": 0.5,
                "projector_input_dim": 32,
                "projector_output_dim": 32,
                "vision_output_dim": 32,
            },
            image_token_index=IMAGE_ID,
            boi_token_index=IMAGE_START_ID,
            eoi_token_index=IMAGE_END_ID,
        )
    if family == "llava_mixtral":
        return LlavaConfig(
            text_config=_mixtral_config(),
            # 16x16 image, 8x8 patches -> 4 patch tokens (the CLS token is dropped by the "default" strategy).
            vision_config=CLIPVisionConfig(
                hidden_size=32,
                intermediate_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                image_size=16,
                patch_size=8,
                projection_dim=32,
            ),
            image_token_index=IMAGE_ID,
            image_seq_length=4,
            vision_feature_layer=-1,
        )
    raise ValueError(f"Unknown MoE family {family!r}; expected one of {MOE_FAMILIES}")


_MODEL_CLASSES: dict[str, type[PreTrainedModel]] = {
    "mixtral": MixtralForCausalLM,
    "qwen2_moe": Qwen2MoeForCausalLM,
    "qwen3_moe": Qwen3MoeForCausalLM,
    "olmoe": OlmoeForCausalLM,
    "qwen3_vl_moe": Qwen3VLMoeForConditionalGeneration,
    "llama4": Llama4ForConditionalGeneration,
    "llava_mixtral": LlavaForConditionalGeneration,
}


def text_config(model: PreTrainedModel) -> PreTrainedConfig:
    """Return the text (language-model) sub-config of ``model``; the config itself for text-only models."""
    return model.config.get_text_config(decoder=True)


def image_token_id(model: PreTrainedModel) -> int | None:
    """Return the id of the image placeholder token, or ``None`` for text-only models."""
    return getattr(model.config, "image_token_id", None)


def moe_layer_count(family: str) -> int:
    """Return the number of MoE decoder layers in the tiny model of ``family`` (all of its decoder layers)."""
    if family not in MOE_FAMILIES:
        raise ValueError(f"Unknown MoE family {family!r}; expected one of {MOE_FAMILIES}")
    return NUM_LAYERS


def make_tiny_moe(family: str, seed: int = 0, experts_implementation: str | None = None) -> PreTrainedModel:
    """Build a tiny random float32 model of ``family`` in eval mode.

    ``experts_implementation`` ("eager", "grouped_mm", "batched_mm") is applied to the text config, which is where
    the experts read it from; ``None`` keeps the transformers default ("grouped_mm" where supported). Llama4's experts
    ignore the setting, so only ``None``/"eager" are accepted for it. Router weights are re-drawn with std
    ``ROUTER_INIT_STD`` so that routing is decisive and differs between tokens.
    """
    model_class = _MODEL_CLASSES[family]
    kwargs = {}
    if experts_implementation is not None:
        if family not in EXPERTS_IMPLEMENTATION_FAMILIES and experts_implementation != "eager":
            raise ValueError(f"{family} experts do not support experts_implementation={experts_implementation!r}")
        # Llava and Llama4 refuse "grouped_mm" at the top level (their own modeling file has no experts), so there
        # only the text sub-config, which the experts read, gets it.
        kwargs["experts_implementation"] = (
            experts_implementation
            if model_class._can_set_experts_implementation()
            else {"text_config": experts_implementation}
        )
    torch.manual_seed(seed)
    model = model_class._from_config(_build_config(family), attn_implementation="eager", dtype=torch.float32, **kwargs)
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith((".mlp.gate", ".feed_forward.router")):
                module.weight.normal_(0.0, ROUTER_INIT_STD)
    return model.eval()


def _num_image_tokens(config: PreTrainedConfig, family: str) -> int:
    vision = config.vision_config
    if family == "qwen3_vl_moe":
        t, h, w = _QWEN_VL_GRID
        return t * h * w // vision.spatial_merge_size**2
    num_patches = (vision.image_size // vision.patch_size) ** 2
    if family == "llama4":
        return int(num_patches * vision.pixel_shuffle_ratio**2)
    return num_patches + (config.vision_feature_select_strategy == "full")


def _pixel_inputs(config: PreTrainedConfig, family: str, batch_size: int, gen: torch.Generator) -> dict:
    vision = config.vision_config
    if family == "qwen3_vl_moe":
        # Flattened patches, one row per (t, h, w) patch: (num_patches, channels * temporal_patch * patch * patch).
        t, h, w = _QWEN_VL_GRID
        patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
        return {
            "pixel_values": torch.randn(batch_size * t * h * w, patch_dim, generator=gen),
            "image_grid_thw": torch.tensor([_QWEN_VL_GRID] * batch_size),
        }
    size = vision.image_size
    return {"pixel_values": torch.randn(batch_size, vision.num_channels, size, size, generator=gen)}


def make_inputs(
    model: PreTrainedModel,
    family: str,
    batch_size: int = 2,
    seq_len: int = 12,
    with_image: bool = True,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Build a batch accepted by ``model.forward`` (and ``generate``) that yields a loss.

    Returns ``input_ids``, ``attention_mask`` and ``labels`` (a copy of ``input_ids``). ``seq_len`` counts the random
    text tokens, which never use special ids. For vision families with ``with_image=True`` each sample also gets one
    image: its placeholder tokens (wrapped in start/end tokens where the family has them) are inserted after the
    first third of the text, expanded to exactly as many tokens as the vision tower yields, and the pixel inputs
    (``pixel_values``, plus ``image_grid_thw`` and ``mm_token_type_ids`` for Qwen3-VL) are added. The global RNG is
    left untouched.
    """
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(*TEXT_IDS, (batch_size, seq_len), generator=gen)
    extra = {}
    if with_image and family in VISION_FAMILIES:
        config = model.config
        image = [config.image_token_id] * _num_image_tokens(config, family)
        if family == "qwen3_vl_moe":
            image = [config.vision_start_token_id, *image, config.vision_end_token_id]
        elif family == "llama4":
            image = [config.boi_token_id, *image, config.eoi_token_id]
        cut = seq_len // 3
        image_ids = torch.tensor(image).expand(batch_size, -1)
        input_ids = torch.cat([input_ids[:, :cut], image_ids, input_ids[:, cut:]], dim=1)
        extra = _pixel_inputs(config, family, batch_size, gen)
        if family == "qwen3_vl_moe":
            extra["mm_token_type_ids"] = (input_ids == config.image_token_id).int()
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": input_ids.clone(),
        **extra,
    }
