"""PathWeave: modality stages over time, adapter-in-adapters, gates, and exact preservation of earlier stages."""

from __future__ import annotations

import pytest
import torch
from helpers import snapshot, train_steps
from peft import get_peft_model
from tiny_vlms import make_tiny_vlm, make_vlm_inputs

from peft_moextend import PathWeaveConfig
from peft_moextend.pathweave import PathWeaveLayer


def with_modalities(batch: dict, audio_positions: slice | None = None) -> dict:
    """Explicit modality ids: image placeholders (LLaVA's id 127) are image; optionally some positions audio."""
    modality_ids = (batch["input_ids"] == 127).long()
    if audio_positions is not None:
        modality_ids[:, audio_positions] = 3
    return {**batch, "modality_ids": modality_ids}


def test_new_modality_keeps_earlier_outputs_and_text_exactly():
    model = make_tiny_vlm("llava")
    image_batch = with_modalities(make_vlm_inputs(model, "llava"))
    text_batch = with_modalities(make_vlm_inputs(model, "llava", with_media=False))
    with torch.no_grad():
        text_base = model(**text_batch).logits
    peft_model = get_peft_model(model, PathWeaveConfig(r=4, modalities=["image"]))
    train_steps(peft_model, image_batch, steps=3)
    with torch.no_grad():
        image_stage_0 = peft_model(**image_batch).logits
        assert torch.equal(peft_model(**text_batch).logits, text_base)  # text tokens keep the base computation

    report = peft_model.base_model.add_modality("audio")
    layers = [m for m in peft_model.modules() if isinstance(m, PathWeaveLayer)]
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("_1." in n for n in trainable)  # only stage 1: adapter, in-adapters, gate
    # per layer: down (r, in) + up (out, r) + scale + one in-adapter (r, r) + a gate over 2 adapters (2, in) and its
    # noise matrix (2, in)
    expected = sum(4 * m.in_features + m.out_features * 4 + 1 + 4 * 4 + 2 * 2 * m.in_features for m in layers)
    assert report["trainable"] == expected
    assert 0 < report["fraction_of_base"] < 0.2

    audio_batch = with_modalities(make_vlm_inputs(model, "llava", with_media=False, seed=3), slice(2, 8))
    before = snapshot(peft_model)
    train_steps(peft_model, audio_batch, steps=3)
    changed = {n for n in before if not torch.equal(before[n], dict(peft_model.named_parameters())[n])}
    assert changed and all("_1." in n for n in changed)
    with torch.no_grad():
        assert torch.equal(peft_model(**image_batch).logits, image_stage_0)
        assert torch.equal(peft_model(**text_batch).logits, text_base)
        audio = peft_model(**audio_batch).logits
        with peft_model.disable_adapter():
            assert not torch.allclose(audio, peft_model(**audio_batch).logits)  # the audio path does something


def test_in_adapters_start_as_identity_and_gate_mixes_all_adapters():
    model = make_tiny_vlm("llava")
    peft_model = get_peft_model(model, PathWeaveConfig(r=2, modalities=["image"]))
    peft_model.base_model.add_modality("video")
    layer = next(m for m in peft_model.modules() if isinstance(m, PathWeaveLayer))
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if "pathweave_up" in name:
                p.normal_()
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        got = layer._stage_delta("default", 1, x)
        outs = [
            getattr(layer, f"pathweave_up_{k}")["default"] @ (getattr(layer, f"pathweave_down_{k}")["default"] @ x.T)
            for k in (0, 1)
        ]
        expected = (outs[0] + outs[1]).T / 2  # zero in-adapters: identity; zero gate: uniform over 2 adapters
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_bad_input():
    model = make_tiny_vlm("llava")
    peft_model = get_peft_model(model, PathWeaveConfig(modalities=["image"]))
    with pytest.raises(ValueError, match="already added"):
        peft_model.base_model.add_modality("image")
    with pytest.raises(ValueError, match="unknown modalities"):
        peft_model.base_model.add_modality("smell")
    peft_model.base_model.add_modality("audio")
    with pytest.raises(ValueError, match=r"no placeholder token id.*audio.*modality_ids"):
        peft_model(**make_vlm_inputs(model, "llava"))
    with pytest.raises(ValueError, match="duplicates"):
        PathWeaveConfig(modalities=["image", "image"])
