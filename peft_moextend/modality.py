"""Per-token modality masks derived from the placeholder tokens of HF multimodal models.

Vision/audio-language models in transformers mark image, video and audio positions in `input_ids` with placeholder
tokens whose ids live on the model config (`image_token_id` / `image_token_index`, `video_token_id`, ...). Every
method of this package that treats modalities differently reads its masks from here.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

MODALITIES: tuple[str, ...] = ("text", "image", "video", "audio")
"""Modality names; a modality's index in this tuple is its id in `modality_ids` tensors (text = 0)."""

_TOKEN_ID_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "image": ("image_token_id", "image_token_index"),
    "video": ("video_token_id", "video_token_index"),
    "audio": ("audio_token_id", "audio_token_index"),
}


def validate_modalities(names: Iterable[str], option: str, also_allowed: tuple[str, ...] = ()) -> tuple[str, ...]:
    """Check that every entry of `option` (a config option or argument) names a known modality, or one of
    `also_allowed` (e.g. SMoLA's "multimodal" group); returns them as a tuple. The one place that raises the
    unknown-modality error."""
    names = tuple(names)
    allowed = (*MODALITIES, *also_allowed)
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise ValueError(f"`{option}` contains unknown modalities {unknown}; choose from {list(allowed)}.")
    return names


def modality_index(name: str, option: str = "modality") -> int:
    """Id of modality `name` in `MODALITIES`; the unknown-modality error, naming `option`, for other names."""
    validate_modalities((name,), option)
    return MODALITIES.index(name)


def modality_token_ids(config) -> dict[str, int]:
    """Placeholder token id per non-text modality found on a transformers config (top level, then `text_config`)."""
    found: dict[str, int] = {}
    configs = [config, getattr(config, "text_config", None)]
    for modality, attributes in _TOKEN_ID_ATTRIBUTES.items():
        for cfg in configs:
            if cfg is None:
                continue
            value = next((getattr(cfg, a) for a in attributes if isinstance(getattr(cfg, a, None), int)), None)
            if value is not None:
                found[modality] = value
                break
    return found


def modality_ids_from_input_ids(input_ids: torch.Tensor, token_ids: dict[str, int]) -> torch.Tensor:
    """Modality id of every position, `(batch, seq)` long tensor; positions holding no placeholder are text (0)."""
    ids = torch.zeros_like(input_ids, dtype=torch.long)
    for modality, token_id in token_ids.items():
        ids = torch.where(input_ids == token_id, modality_index(modality), ids)
    return ids


_TOWER_PARTS: dict[str, str] = {
    "audio_tower": "audio",
    "audio_model": "audio",
    "audio_encoder": "audio",
    "vision_tower": "image",
    "vision_model": "image",
    "vision_encoder": "image",
    "visual": "image",
    "multi_modal_projector": "image",
    "connector": "image",
}


def media_tower(module_name: str) -> tuple[str, str] | None:
    """`(tower name, modality)` if the module sits in a vision/audio tower (or its projector), else None.

    Towers process only their own kind of input (`model.vision_tower...`, `model.visual...`, `audio_tower...`), so
    all their tokens count as that modality (a vision tower that also encodes videos is told per call, see
    `call_inputs`). Language-model modules return None: their tokens need per-position ids.
    """
    parts = module_name.split(".")
    for position, part in enumerate(parts):
        modality = _TOWER_PARTS.get(part)
        if modality is not None:
            return ".".join(parts[: position + 1]), modality
    return None


def tower_modality(module_name: str) -> str | None:
    """Modality of every token a module sees if it sits in a media tower (see `media_tower`), else None."""
    tower = media_tower(module_name)
    return None if tower is None else tower[1]
