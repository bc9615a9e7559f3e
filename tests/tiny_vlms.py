"""Tiny, randomly initialised transformers vision-/audio-language models (built from configs only) for tests of
per-token modality masks.

Every family has a text model with hidden size 32, 2 decoder layers, 4 attention heads (2 KV heads, head dim 8) and
vocab 128, and a 1-layer media tower of hidden size 32; weights are float32, attention is eager, word embeddings
are untied. Every image (or audio clip) becomes 4 placeholder tokens in ``input_ids``, except llava_next (14).

Where things live (transformers 5.23; model classes ``<Family>ForConditionalGeneration``, see ``_MODEL_CLASSES``).
Every language-model decoder layer holds ``self_attn.{q,k,v,o}_proj`` and ``mlp.{gate,up,down}_proj``; "placeholder"
is the config attribute holding the image (audio) placeholder id:

family       placeholder        language model        media tower         projector
-----------  -----------------  --------------------  ------------------  ---------------------------
llava        image_token_index  model.language_model  model.vision_tower  model.multi_modal_projector
llava_next   image_token_index  model.language_model  model.vision_tower  model.multi_modal_projector
qwen2_vl     image_token_id     model.language_model  model.visual        model.visual.merger
qwen2_5_vl   image_token_id     model.language_model  model.visual        model.visual.merger
qwen3_vl     image_token_id     model.language_model  model.visual        model.visual.merger
idefics3     image_token_id     model.text_model      model.vision_model  model.connector
smolvlm      image_token_id     model.text_model      model.vision_model  model.connector
gemma3       image_token_index  model.language_model  model.vision_tower  model.multi_modal_projector
paligemma    image_token_index  model.language_model  model.vision_tower  model.multi_modal_projector
internvl     image_token_id     model.language_model  model.vision_tower  model.multi_modal_projector
qwen2_audio  audio_token_index  model.language_model  model.audio_tower   model.multi_modal_projector

``*_index`` attributes are also readable as ``*_id`` through the config's ``attribute_map``; the Qwen-VL families
also define ``video_token_id``. Media towers reuse LM linear names: CLIP/SigLIP/Idefics3/InternVL/Qwen2-Audio
attention has ``q_proj``/``k_proj``/``v_proj`` and the Qwen2.5-VL vision MLP has ``gate_proj``/``up_proj``/
``down_proj``, so suffix matching alone does not separate LM linears from tower linears: exclude
``vision_tower_prefix(model)`` (or keep only ``language_model_prefix(model)``). Projectors use other names
(``linear_1``, ``linear``, ``proj``, ``mlp.0``, ``linear_fc1``...); Gemma3's is a bare weight matrix, no Linear.

Quirks (what ``make_vlm_inputs`` does about them):
- Qwen-VL: pixel inputs are flattened patches plus ``image_grid_thw``; ``mm_token_type_ids`` (1 at image tokens) is
  required whenever ``image_grid_thw`` is given (M-RoPE). Placeholders are wrapped in vision start/end tokens.
  Qwen3-VL additionally adds ("deepstack") visual features to the hidden states at the placeholder positions after
  the first decoder layer, so the LM sees media features beyond its input embeddings.
- llava_next: ``pixel_values`` is (batch, crops, C, H, W) with ``image_sizes``; an image becomes the base-crop features
  then the high-resolution grid with one learned ``image_newline`` embedding closing every row, all at placeholder
  positions (so some placeholder positions hold a learned parameter, not tower output).
- idefics3/smolvlm: ``pixel_values`` is (batch, images, C, H, W) plus ``pixel_attention_mask``; all-zero images are
  dropped as padding.
- gemma3: placeholders wrapped in begin/end-of-image tokens; ``token_type_ids`` (1 at image tokens) makes each image
  attend to itself bidirectionally. Text embeddings are scaled by sqrt(hidden), media embeddings are not.
- paligemma: the image comes first, then BOS and the text; ``token_type_ids`` is 0 for the prefix (image, BOS and the
  first third of the text), attended bidirectionally, and 1 for the causal suffix. As the processor does, ``labels``
  is -100 on the prefix. Position ids are 1-based.
- qwen2_audio: ``input_features`` must be exactly ``2 * max_source_positions`` mel frames long, with
  ``feature_attention_mask``. A lone audio placeholder (no two adjacent) switches the model to its legacy path, which
  expands it into as many positions as the clip has features, so placeholders are always pre-expanded here.
"""

from __future__ import annotations

import math

import torch
from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    InternVLConfig,
    InternVLForConditionalGeneration,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    PreTrainedConfig,
    PreTrainedModel,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2AudioConfig,
    Qwen2AudioForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
)

VLM_FAMILIES: tuple[str, ...] = (
    "llava",
    "llava_next",
    "qwen2_vl",
    "qwen2_5_vl",
    "qwen3_vl",
    "idefics3",
    "smolvlm",
    "gemma3",
    "paligemma",
    "internvl",
    "qwen2_audio",
)
QWEN_VL_FAMILIES: tuple[str, ...] = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
AUDIO_FAMILIES: tuple[str, ...] = ("qwen2_audio",)

VOCAB_SIZE = 128
# Token ids: 0-2 are pad/bos/eos, the top 5 ids are reserved for multimodal special tokens, the rest is plain text.
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
IMAGE_ID, MEDIA_START_ID, MEDIA_END_ID, VIDEO_ID, AUDIO_ID = 127, 126, 125, 124, 123
TEXT_IDS = (3, 123)  # [low, high) range for random text tokens

LM_LINEAR_NAMES: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

_TEXT = {
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "max_position_embeddings": 256,
    "pad_token_id": PAD_ID,
    "bos_token_id": BOS_ID,
    "eos_token_id": EOS_ID,
}
# Qwen-VL text models use M-RoPE: the (t, h, w) sections split head_dim / 2 = 4 rotary frequencies.
_QWEN_VL_ROPE = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}
_QWEN_VL_TEXT = {**_TEXT, "rope_parameters": _QWEN_VL_ROPE}
_QWEN_VL_IDS = {
    "image_token_id": IMAGE_ID,
    "video_token_id": VIDEO_ID,
    "vision_start_token_id": MEDIA_START_ID,
    "vision_end_token_id": MEDIA_END_ID,
}
_QWEN_VL_VISION = {"depth": 1, "num_heads": 2, "patch_size": 4, "temporal_patch_size": 2, "spatial_merge_size": 2}
# Qwen-VL image: a (t, h, w) grid of 4x4-pixel patches; spatial_merge_size 2 merges 2x2 patches into one token.
_QWEN_VL_GRID = (1, 4, 4)
# ViT towers (CLIP, SigLIP, Idefics3, InternVL). 16x16 image, 8x8 patches -> 4 patches (llava, llava_next crops,
# paligemma).
_VIT_16 = {
    "hidden_size": 32,
    "intermediate_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "image_size": 16,
    "patch_size": 8,
}
# 32x32 image, 8x8 patches -> 16 patches, pooled/pixel-shuffled 2x2 -> 4 tokens (Idefics3, SmolVLM, Gemma3, InternVL).
_VIT_32 = {**_VIT_16, "image_size": 32}
# LlavaNext: a 16x32 (h, w) image is split into a 1x2 grid of 16x16 crops, plus the resized base crop.
_LLAVA_NEXT_IMAGE_SIZE = (16, 32)


def _build_config(family: str) -> PreTrainedConfig:
    if family == "llava":
        return LlavaConfig(
            text_config={**_TEXT, "model_type": "llama"},
            vision_config={**_VIT_16, "model_type": "clip_vision_model"},
            image_token_index=IMAGE_ID,
            image_seq_length=4,
            vision_feature_layer=-1,
            tie_word_embeddings=False,
        )
    if family == "llava_next":
        return LlavaNextConfig(
            text_config={**_TEXT, "model_type": "llama"},
            vision_config={**_VIT_16, "model_type": "clip_vision_model"},
            image_token_index=IMAGE_ID,
            image_grid_pinpoints=[list(_LLAVA_NEXT_IMAGE_SIZE)],
            vision_feature_layer=-1,
            tie_word_embeddings=False,
        )
    if family == "qwen2_vl":
        return Qwen2VLConfig(
            text_config=_QWEN_VL_TEXT,
            vision_config={**_QWEN_VL_VISION, "embed_dim": 32, "hidden_size": 32, "mlp_ratio": 1},
            **_QWEN_VL_IDS,
        )
    if family == "qwen2_5_vl":
        return Qwen2_5_VLConfig(
            text_config=_QWEN_VL_TEXT,
            vision_config={
                **_QWEN_VL_VISION,
                "hidden_size": 32,
                "intermediate_size": 32,
                "out_hidden_size": 32,
                "window_size": 16,
                "fullatt_block_indexes": [0],
            },
            **_QWEN_VL_IDS,
        )
    if family == "qwen3_vl":
        return Qwen3VLConfig(
            text_config=_QWEN_VL_TEXT,
            vision_config={
                **_QWEN_VL_VISION,
                "hidden_size": 32,
                "intermediate_size": 32,
                "out_hidden_size": 32,
                "num_position_embeddings": 16,
                "deepstack_visual_indexes": [0],
            },
            **_QWEN_VL_IDS,
        )
    if family in ("idefics3", "smolvlm"):
        config_class = Idefics3Config if family == "idefics3" else SmolVLMConfig
        return config_class(
            text_config={**_TEXT, "model_type": "llama"},
            vision_config=_VIT_32,
            image_token_id=IMAGE_ID,
            scale_factor=2,
        )
    if family == "gemma3":
        return Gemma3Config(
            text_config={**_TEXT, "layer_types": ["sliding_attention", "full_attention"], "sliding_window": 64},
            vision_config={**_VIT_32, "model_type": "siglip_vision_model", "vision_use_head": False},
            mm_tokens_per_image=4,
            image_token_index=IMAGE_ID,
            boi_token_index=MEDIA_START_ID,
            eoi_token_index=MEDIA_END_ID,
            tie_word_embeddings=False,
        )
    if family == "paligemma":
        return PaliGemmaConfig(
            text_config={**_TEXT, "model_type": "gemma"},
            vision_config={**_VIT_16, "model_type": "siglip_vision_model", "vision_use_head": False},
            image_token_index=IMAGE_ID,
            vocab_size=VOCAB_SIZE,
            projection_dim=32,
            hidden_size=32,
            tie_word_embeddings=False,
        )
    if family == "internvl":
        return InternVLConfig(
            text_config={**_TEXT, "model_type": "qwen2"},
            vision_config=_VIT_32,
            image_token_id=IMAGE_ID,
            image_seq_length=4,
            downsample_ratio=0.5,
            tie_word_embeddings=False,
        )
    if family == "qwen2_audio":
        # 16 mel bins x 16 frames -> conv (stride 2) -> 8 positions -> average pool (stride 2) -> 4 audio tokens.
        return Qwen2AudioConfig(
            text_config={**_TEXT, "model_type": "qwen2"},
            audio_config={
                "d_model": 32,
                "encoder_layers": 1,
                "encoder_attention_heads": 2,
                "encoder_ffn_dim": 32,
                "num_mel_bins": 16,
                "max_source_positions": 8,
            },
            audio_token_index=AUDIO_ID,
        )
    raise ValueError(f"Unknown VLM family {family!r}; expected one of {VLM_FAMILIES}")


_MODEL_CLASSES: dict[str, type[PreTrainedModel]] = {
    "llava": LlavaForConditionalGeneration,
    "llava_next": LlavaNextForConditionalGeneration,
    "qwen2_vl": Qwen2VLForConditionalGeneration,
    "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
    "qwen3_vl": Qwen3VLForConditionalGeneration,
    "idefics3": Idefics3ForConditionalGeneration,
    "smolvlm": SmolVLMForConditionalGeneration,
    "gemma3": Gemma3ForConditionalGeneration,
    "paligemma": PaliGemmaForConditionalGeneration,
    "internvl": InternVLForConditionalGeneration,
    "qwen2_audio": Qwen2AudioForConditionalGeneration,
}
# Attribute of the inner ``model`` holding the media (vision or audio) encoder, per naming convention.
_TOWER_ATTRS: tuple[str, ...] = ("vision_tower", "visual", "vision_model", "audio_tower")
# Config attributes a generic library reads the placeholder ids from, per modality.
_MEDIA_TOKEN_ATTRS: dict[str, tuple[str, ...]] = {
    "image": ("image_token_id", "image_token_index"),
    "video": ("video_token_id", "video_token_index"),
    "audio": ("audio_token_id", "audio_token_index"),
}


def make_tiny_vlm(family: str, seed: int = 0) -> PreTrainedModel:
    """Build the tiny random float32 model of ``family`` (seeded with ``seed``) with eager attention, in eval mode."""
    if family not in _MODEL_CLASSES:
        raise ValueError(f"Unknown VLM family {family!r}; expected one of {VLM_FAMILIES}")
    config = _build_config(family)
    torch.manual_seed(seed)
    model = _MODEL_CLASSES[family]._from_config(config, attn_implementation="eager", dtype=torch.float32)
    return model.eval()


def media_token_ids(model: PreTrainedModel) -> dict[str, int]:
    """Map each modality ("image", "video", "audio") of ``model`` to its placeholder token id.

    Reads the config generically: the top-level attributes first, then the text sub-config.
    """
    configs = [model.config, model.config.get_text_config(decoder=True)]
    ids = {}
    for modality, attrs in _MEDIA_TOKEN_ATTRS.items():
        found = [getattr(c, a) for c in configs for a in attrs if getattr(c, a, None) is not None]
        if found:
            ids[modality] = found[0]
    return ids


def language_model_linear_names(family: str) -> list[str]:
    """Return the module-name suffixes of the attention/MLP linears of the language model of ``family``."""
    if family not in _MODEL_CLASSES:
        raise ValueError(f"Unknown VLM family {family!r}; expected one of {VLM_FAMILIES}")
    return list(LM_LINEAR_NAMES)


def language_model_prefix(model: PreTrainedModel) -> str:
    """Return the qualified module name of the language model (decoder stack) of ``model``."""
    return "model.text_model" if hasattr(model.model, "text_model") else "model.language_model"


def vision_tower_prefix(model: PreTrainedModel) -> str:
    """Return the qualified module name of the media (vision or audio) encoder of ``model``, e.g. "model.visual"."""
    for attr in _TOWER_ATTRS:
        if hasattr(model.model, attr):
            return f"model.{attr}"
    raise ValueError(f"{type(model).__name__} has no media tower among model.{_TOWER_ATTRS}")


def _num_media_tokens(config: PreTrainedConfig, family: str) -> int:
    """Number of placeholder tokens one image/clip expands to, as the family's processor computes it."""
    if family == "qwen2_audio":
        frames = 2 * config.audio_config.max_source_positions
        return ((frames - 1) // 2 + 1 - 2) // 2 + 1
    if family in QWEN_VL_FAMILIES:
        t, h, w = _QWEN_VL_GRID
        return t * h * w // config.vision_config.spatial_merge_size**2
    if family == "gemma3":
        return config.mm_tokens_per_image
    if family == "internvl":
        return config.image_seq_length
    if family == "paligemma":
        return config.text_config.num_image_tokens
    vision = config.vision_config
    side = vision.image_size // vision.patch_size
    if family in ("idefics3", "smolvlm"):
        return side**2 // config.scale_factor**2
    if family == "llava_next":
        # Base crop, then the crop grid at patch resolution with one newline embedding closing every row (the image
        # has the aspect ratio of its grid, so nothing is unpadded).
        rows, cols = (s // vision.image_size * side for s in _LLAVA_NEXT_IMAGE_SIZE)
        return side**2 + rows * (cols + 1)
    return side**2 + (config.vision_feature_select_strategy == "full")  # llava: "full" keeps the CLS token


def _media_inputs(config: PreTrainedConfig, family: str, batch_size: int, gen: torch.Generator) -> dict:
    if family == "qwen2_audio":
        audio = config.audio_config
        frames = 2 * audio.max_source_positions
        return {
            "input_features": torch.randn(batch_size, audio.num_mel_bins, frames, generator=gen),
            "feature_attention_mask": torch.ones(batch_size, frames, dtype=torch.long),
        }
    vision = config.vision_config
    if family in QWEN_VL_FAMILIES:
        # Flattened patches, one row per (t, h, w) patch: (num_patches, channels * temporal_patch * patch * patch).
        t, h, w = _QWEN_VL_GRID
        patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
        return {
            "pixel_values": torch.randn(batch_size * t * h * w, patch_dim, generator=gen),
            "image_grid_thw": torch.tensor([_QWEN_VL_GRID] * batch_size),
        }
    size = vision.image_size[0] if family == "internvl" else vision.image_size
    if family == "llava_next":
        height, width = _LLAVA_NEXT_IMAGE_SIZE
        crops = 1 + (height // size) * (width // size)
        return {
            "pixel_values": torch.randn(batch_size, crops, vision.num_channels, size, size, generator=gen),
            "image_sizes": torch.tensor([_LLAVA_NEXT_IMAGE_SIZE] * batch_size),
        }
    if family in ("idefics3", "smolvlm"):
        return {
            "pixel_values": torch.randn(batch_size, 1, vision.num_channels, size, size, generator=gen),
            "pixel_attention_mask": torch.ones(batch_size, 1, size, size, dtype=torch.bool),
        }
    return {"pixel_values": torch.randn(batch_size, vision.num_channels, size, size, generator=gen)}


def make_vlm_inputs(
    model: PreTrainedModel,
    family: str,
    batch_size: int = 2,
    seq_len: int = 12,
    with_media: bool = True,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Build a batch accepted by ``model.forward`` (and ``generate``) that yields a loss.

    Returns ``input_ids``, ``attention_mask`` and ``labels`` (a copy of ``input_ids``; for paligemma with media -100
    on the bidirectional prefix). ``seq_len`` counts the random text tokens, which never use special ids. With
    ``with_media=True`` each sample also gets one image (audio clip for qwen2_audio): its placeholder tokens, expanded
    to exactly as many tokens as the model inserts media embeddings and wrapped in start/end tokens where the family
    has them, go after the first third of the text (first, before BOS, for paligemma), and the media inputs are added:
    ``pixel_values`` plus ``image_grid_thw`` and ``mm_token_type_ids`` (Qwen-VL), ``image_sizes`` (llava_next),
    ``pixel_attention_mask`` (idefics3, smolvlm), ``token_type_ids`` (gemma3, paligemma), or ``input_features`` and
    ``feature_attention_mask`` (qwen2_audio). The global RNG is left untouched.
    """
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(*TEXT_IDS, (batch_size, seq_len), generator=gen)
    if not with_media:
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}

    config = model.config
    placeholder = media_token_ids(model)["audio" if family in AUDIO_FAMILIES else "image"]
    media = [placeholder] * _num_media_tokens(config, family)
    if family in QWEN_VL_FAMILIES:
        media = [config.vision_start_token_id, *media, config.vision_end_token_id]
    elif family == "gemma3":
        media = [config.boi_token_id, *media, config.eoi_token_id]
    cut = seq_len // 3
    media_ids = torch.tensor(media).expand(batch_size, -1)
    if family == "paligemma":
        bos = torch.full((batch_size, 1), config.text_config.bos_token_id)
        input_ids = torch.cat([media_ids, bos, input_ids], dim=1)
        prefix_len = len(media) + 1 + cut
    else:
        input_ids = torch.cat([input_ids[:, :cut], media_ids, input_ids[:, cut:]], dim=1)
    batch = {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": input_ids.clone(),
        **_media_inputs(config, family, batch_size, gen),
    }
    if family in QWEN_VL_FAMILIES:
        batch["mm_token_type_ids"] = (input_ids == placeholder).int()
    elif family == "gemma3":
        batch["token_type_ids"] = (input_ids == placeholder).long()
    elif family == "paligemma":
        batch["token_type_ids"] = (torch.arange(input_ids.shape[1]) >= prefix_len).long().expand(batch_size, -1)
        batch["labels"][:, :prefix_len] = -100
    return batch


_QWEN_VL_VIDEO_GRID = (2, 4, 4)  # two temporal patches of a 4x4 patch grid -> 8 tokens


def make_qwen_vl_image_and_video_inputs(model: PreTrainedModel, family: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A Qwen-VL batch of two samples of equal length: sample 0 holds an image, sample 1 a video (its frames go
    through the same vision tower as images). Placeholders are wrapped in vision start/end tokens;
    ``mm_token_type_ids`` is 1 at image and 2 at video tokens, as the processor writes it."""
    assert family in QWEN_VL_FAMILIES
    gen = torch.Generator().manual_seed(seed)
    config, vision = model.config, model.config.vision_config
    merge = vision.spatial_merge_size**2
    image_tokens = math.prod(_QWEN_VL_GRID) // merge
    video_tokens = math.prod(_QWEN_VL_VIDEO_GRID) // merge
    length = 12 + video_tokens + 2
    rows = []
    for placeholder, count in ((config.image_token_id, image_tokens), (config.video_token_id, video_tokens)):
        text = torch.randint(*TEXT_IDS, (length - count - 2,), generator=gen)
        media = torch.tensor([config.vision_start_token_id, *[placeholder] * count, config.vision_end_token_id])
        rows.append(torch.cat([text[:4], media, text[4:]]))
    input_ids = torch.stack(rows)
    patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "labels": input_ids.clone(),
        "pixel_values": torch.randn(math.prod(_QWEN_VL_GRID), patch_dim, generator=gen),
        "image_grid_thw": torch.tensor([_QWEN_VL_GRID]),
        "pixel_values_videos": torch.randn(math.prod(_QWEN_VL_VIDEO_GRID), patch_dim, generator=gen),
        "video_grid_thw": torch.tensor([_QWEN_VL_VIDEO_GRID]),
        "mm_token_type_ids": (input_ids == config.image_token_id).int()
        + 2 * (input_ids == config.video_token_id).int(),
    }
