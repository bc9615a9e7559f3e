"""The benchmark's vision-language model: SmolLM2-135M-Instruct inside transformers' `LlavaForConditionalGeneration`
(a small SigLIP vision tower + LLaVA projector), plus small convolutional audio and video encoders + projectors whose
features enter through `inputs_embeds` at `<audio>` / `<video>` placeholder positions (marked with `modality_ids`).

Examples are chat turns,
`<|im_start|>user\\n<image>*16\\n{question}<|im_end|>\\n<|im_start|>assistant\\n{answer}<|im_end|>` (text tasks:
`<|im_start|>user\\n{question}<|im_end|>...`); only the answer and its closing `<|im_end|>` are labels.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from transformers import (
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerBase,
    SiglipVisionConfig,
)

from peft_moextend.modality import modality_index
from peft_moextend.upcycling import upcycle_llama_to_mixtral

from ..smollm2 import load_smollm2
from .data import IMAGE_SIZE, NUM_FRAMES, NUM_MEL_BINS, VIDEO_FRAMES, Task

IMAGE_TOKEN, AUDIO_TOKEN, VIDEO_TOKEN = "<image>", "<audio>", "<video>"
PATCH_SIZE = 7
NUM_IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 16
AUDIO_POOL = 5
NUM_AUDIO_TOKENS = NUM_FRAMES // 2 // AUDIO_POOL  # 10
VIDEO_REGIONS = 2  # per side
NUM_VIDEO_TOKENS = (VIDEO_FRAMES - 1) * VIDEO_REGIONS**2  # 12


class AudioTower(nn.Module):
    """A small convolutional audio encoder + LLaVA-style projector: `(b, 40, 100)` log-mels -> `(b, 10, hidden)`
    tokens, one per 100 ms. (A Whisper encoder trained from scratch here kept its sinusoidal positions dominant:
    its outputs barely varied between clips.)"""

    def __init__(self, hidden_size: int, width: int = 256) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv1d(NUM_MEL_BINS, width, kernel_size=3, padding=1),
            nn.GELU(),
            nn.Conv1d(width, width, kernel_size=4, stride=2, padding=1),  # 100 -> 50 frames
            nn.GELU(),
            nn.Conv1d(width, width, kernel_size=AUDIO_POOL, stride=AUDIO_POOL),  # 50 -> 10 frames
            nn.GELU(),
        )
        # the final LayerNorm puts the tokens on the scale of the image tokens (without it they stayed ~10x smaller
        # than the language model's own embeddings and were drowned in the residual stream)
        self.projector = nn.Sequential(
            nn.Linear(width, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size), nn.LayerNorm(hidden_size)
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.projector(self.encoder(features).transpose(1, 2))


class VideoTower(nn.Module):
    """A small convolutional video encoder + projector: `(b, 4, 28, 28)` frames in [0, 1] -> `(b, 12, hidden)` tokens,
    one per 2x2 region of each of the 3 pairs of consecutive frames. Each pair enters as the frame and its difference
    to the next (2 channels), so every token sees what moved where. The background is 0 and each region keeps its
    strongest response (max pooling): with [-1, 1] frames and average pooling, two videos' tokens differed by 0.01
    per dimension on average (about 1 per dimension is typical), and the language model could not tell them apart."""

    def __init__(self, hidden_size: int, width: int = 128) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(2, width, kernel_size=5, padding=2),
            nn.GELU(),
            nn.Conv2d(width, width, kernel_size=3, stride=2, padding=1),  # 28 -> 14
            nn.GELU(),
            nn.Conv2d(width, width, kernel_size=3, padding=1),  # receptive field 11 pixels: a stroke and its shift
            nn.GELU(),
            nn.AdaptiveMaxPool2d(VIDEO_REGIONS),  # 14 -> 2: the strongest response per region (see `forward`)
        )
        self.projector = nn.Sequential(
            nn.Linear(width, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size), nn.LayerNorm(hidden_size)
        )

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        pairs = torch.stack([frames[:, :-1], frames[:, 1:] - frames[:, :-1]], dim=2)  # (b, 3, 2, 28, 28)
        features = self.encoder(pairs.flatten(0, 1))  # (b*3, w, 2, 2)
        tokens = features.flatten(2).transpose(1, 2).unflatten(0, (frames.shape[0], -1))  # (b, 3, 4, w)
        return self.projector(tokens.flatten(1, 2))


@dataclass
class Vocabulary:
    """Token ids the benchmark needs."""

    tokenizer: PreTrainedTokenizerBase
    image_id: int
    audio_id: int
    video_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def placeholder(self, modality: str) -> int:
        return {"image": self.image_id, "audio": self.audio_id, "video": self.video_id}[modality]


def load_language_model(moe_experts: int = 0):
    """SmolLM2-135M-Instruct with `<image>`, `<audio>` and `<video>` tokens added (mean-initialised rows, never
    predicted in practice); upcycled into a Mixtral MoE with `moe_experts` experts (top-2) when > 0.

    Returns (lm, vocabulary, max |logit difference| of the upcycled model vs the dense one on a text prompt, or
    None for the dense model)."""
    dense, tokenizer = load_smollm2()
    placeholders = [IMAGE_TOKEN, AUDIO_TOKEN, VIDEO_TOKEN]
    tokenizer.add_special_tokens({"additional_special_tokens": placeholders})
    dense.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        embeddings = dense.get_input_embeddings().weight
        embeddings[-len(placeholders) :] = embeddings[: -len(placeholders)].mean(dim=0)
    vocabulary = Vocabulary(tokenizer, *tokenizer.convert_tokens_to_ids(placeholders), tokenizer.pad_token_id)
    if not moe_experts:
        return dense, vocabulary, None
    prompt = torch.tensor([vocabulary.encode("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n")])
    with torch.no_grad():
        dense_logits = dense(input_ids=prompt).logits
        moe = upcycle_llama_to_mixtral(dense, num_experts=moe_experts, num_experts_per_tok=2)
        difference = float((moe(input_ids=prompt).logits - dense_logits).abs().max())
    return moe, vocabulary, difference


def build_vlm(language_model, vocabulary: Vocabulary) -> LlavaForConditionalGeneration:
    """`LlavaForConditionalGeneration` around `language_model` (its weights copied in), with a fresh 2-layer
    SigLIP vision tower (28x28 grey images, 7x7 patches -> 16 tokens) and projector. Eval mode, float32."""
    vision = SiglipVisionConfig(
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        num_channels=1,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=language_model.config,
        image_token_id=vocabulary.image_id,
        image_seq_length=NUM_IMAGE_TOKENS,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        projector_hidden_act="gelu",
        tie_word_embeddings=language_model.config.tie_word_embeddings,
    )
    torch.manual_seed(0)
    vlm = LlavaForConditionalGeneration(config)
    vlm.model.language_model.load_state_dict(language_model.model.state_dict())
    vlm.lm_head.load_state_dict(language_model.lm_head.state_dict())
    return vlm.eval()


class Towers(nn.Module):
    """The parts trained in the alignment stage and then frozen and shared: vision tower, projector, audio and video
    towers."""

    def __init__(self, vlm: LlavaForConditionalGeneration) -> None:
        super().__init__()
        self.vision_tower = vlm.model.vision_tower
        self.multi_modal_projector = vlm.model.multi_modal_projector
        self.audio_tower = AudioTower(vlm.config.text_config.hidden_size)
        self.video_tower = VideoTower(vlm.config.text_config.hidden_size)

    def embed(self, batch: dict) -> torch.Tensor:
        """`(b, tokens, hidden)` embeddings of an audio or video batch (`collate`)."""
        if batch["modality"] == "audio":
            return self.audio_tower(batch["audio_features"])
        return self.video_tower(batch["video_frames"])


PLACEHOLDERS = {"image": NUM_IMAGE_TOKENS, "audio": NUM_AUDIO_TOKENS, "video": NUM_VIDEO_TOKENS}
"""Placeholder tokens per input of each media modality."""


def example(task: Task, inputs: np.ndarray | str, answer: str, vocabulary: Vocabulary) -> dict:
    """One chat-turn example of `task` (see the module docstring); `answer` may be any label string. A text task's
    input is its question."""
    if task.modality == "text":
        prompt = vocabulary.encode(f"<|im_start|>user\n{inputs}<|im_end|>\n<|im_start|>assistant\n")
        placeholder = None
    else:
        placeholder, count = vocabulary.placeholder(task.modality), PLACEHOLDERS[task.modality]
        prompt = (
            vocabulary.encode("<|im_start|>user\n")
            + [placeholder] * count
            + vocabulary.encode(f"\n{task.question}<|im_end|>\n<|im_start|>assistant\n")
        )
    target = vocabulary.encode(f"{answer}<|im_end|>")
    modality = modality_index(task.modality)
    return {
        "input_ids": prompt + target,
        "labels": [-100] * len(prompt) + target,
        "modality_ids": [modality if t == placeholder else 0 for t in prompt] + [0] * len(target),
        "inputs": inputs,
        "modality": task.modality,
    }


def collate(rows: list[dict], pad_id: int) -> dict:
    """Right-padded batch of examples of one modality."""
    length = max(len(r["input_ids"]) for r in rows)

    def pad(key: str, value: int) -> torch.Tensor:
        return torch.tensor([r[key] + [value] * (length - len(r[key])) for r in rows])

    batch = {
        "input_ids": pad("input_ids", pad_id),
        "attention_mask": torch.tensor(
            [[1] * len(r["input_ids"]) + [0] * (length - len(r["input_ids"])) for r in rows]
        ),
        "labels": pad("labels", -100),
        "modality_ids": pad("modality_ids", 0),
        "modality": rows[0]["modality"],
    }
    if batch["modality"] == "text":
        return batch
    inputs = torch.from_numpy(np.stack([r["inputs"] for r in rows]))
    if batch["modality"] == "image":
        batch["pixel_values"] = (inputs[:, None] - 0.5) / 0.5  # (b, 1, 28, 28) in [-1, 1]
    elif batch["modality"] == "video":
        batch["video_frames"] = inputs  # (b, 4, 28, 28) in [0, 1], background 0
    else:
        batch["audio_features"] = inputs  # (b, 40, 100)
    return batch


def accepts_modality_ids(model: nn.Module) -> bool:
    """Whether `model` (or the transformers model inside a PeftModel) is wrapped by one of this package's methods."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "modality_ids" in inspect.signature(base.forward).parameters


def model_inputs(
    model: nn.Module, towers: Towers, batch: dict, vocabulary: Vocabulary, with_modality_ids: bool | None = None
) -> dict:
    """Keyword arguments for `model(...)` (a Llava model or a PeftModel around one).

    Images take Llava's own path (`input_ids` + `pixel_values`); audio and video tokens are placed at the
    `<audio>` / `<video>` positions of `inputs_embeds`. `modality_ids` (the Llava config has no audio or video
    placeholder id) is given when
    `with_modality_ids`, by default when `model` is wrapped by one of this package's methods.
    """
    common = {"attention_mask": batch["attention_mask"], "labels": batch["labels"]}
    if accepts_modality_ids(model) if with_modality_ids is None else with_modality_ids:
        common["modality_ids"] = batch["modality_ids"]
    if batch["modality"] == "text":
        return {"input_ids": batch["input_ids"], **common}
    if batch["modality"] == "image":
        return {"input_ids": batch["input_ids"], "pixel_values": batch["pixel_values"], **common}
    input_ids = batch["input_ids"]
    is_media = input_ids == vocabulary.placeholder(batch["modality"])
    embeddings = model.get_input_embeddings()(input_ids.masked_fill(is_media, vocabulary.pad_id))
    media = towers.embed(batch).to(embeddings.dtype)  # (b, tokens, h)
    inputs_embeds = embeddings.masked_scatter(is_media[..., None], media.reshape(-1, media.shape[-1]))
    return {"inputs_embeds": inputs_embeds, **common}
