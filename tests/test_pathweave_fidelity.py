"""PathWeave against its reference code (JiazuoYu/PathWeave): the noisy (top-k) gate, the in-adapter that replaces
the bottleneck, and loading adapters saved before these options existed."""

from __future__ import annotations

import json
import zlib

import pytest
import torch
from helpers import snapshot, train_steps
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from tiny_vlms import make_tiny_vlm, make_vlm_inputs
from torch import nn

from peft_moextend import PathWeaveConfig
from peft_moextend.pathweave import PathWeaveLayer
from peft_moextend.pathweave.gate import noisy_top_k_gates

MODALITY_ID = {"image": 1, "video": 2, "audio": 3}


def tiny_pathweave(**options) -> tuple[PeftModel, PathWeaveLayer]:
    """`nn.Linear(4, 3)` with PathWeave (r=2) stages image, video, audio; every adapter tensor random, seeded by its
    name (models with other options hold the same values in the tensors they share)."""
    torch.manual_seed(0)
    config = PathWeaveConfig(r=2, modalities=["image", "video", "audio"], target_modules=["0"], **options)
    peft_model = get_peft_model(nn.Sequential(nn.Linear(4, 3)), config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "pathweave_" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(zlib.crc32(name.encode()))))
    return peft_model, peft_model.base_model.model[0]


def modality_tokens(modality: str, num_tokens: int = 5) -> tuple[dict, torch.Tensor]:
    """`num_tokens` tokens of `modality` for the tiny model: `(t, 4)` inputs, one token per row."""
    torch.manual_seed(1)
    return {"modality_ids": torch.full((num_tokens, 1), MODALITY_ID[modality])}, torch.randn(num_tokens, 4)


def with_modalities(batch: dict, audio_positions: slice | None = None) -> dict:
    """Explicit modality ids: image placeholders (LLaVA's id 127) are image; optionally some positions audio."""
    modality_ids = (batch["input_ids"] == 127).long()
    if audio_positions is not None:
        modality_ids[:, audio_positions] = MODALITY_ID["audio"]
    return {**batch, "modality_ids": modality_ids}


def tensor(layer: PathWeaveLayer, kind: str, stage: int) -> torch.Tensor:
    return getattr(layer, f"pathweave_{kind}_{stage}")["default"].detach()


# the noisy gate


def test_noisy_gate_adds_noise_only_in_training():
    peft_model, layer = tiny_pathweave()
    plain_model, _ = tiny_pathweave(noisy_gate=False)
    kwargs, x = modality_tokens("audio")
    peft_model.eval()
    plain_model.eval()
    with torch.no_grad():
        first, second = peft_model(x, **kwargs), peft_model(x, **kwargs)
        assert torch.equal(first, second)  # eval: deterministic
        assert torch.equal(first, plain_model(x, **kwargs))  # and exactly the plain softmax gate of before
        peft_model.train()
        noisy = [peft_model(x, **kwargs) for _ in range(2)]
    assert not torch.allclose(noisy[0], noisy[1]) and not torch.allclose(noisy[0], first)
    plain_model.train()
    with torch.no_grad():
        assert torch.equal(plain_model(x, **kwargs), first)  # noisy_gate=False: no noise in training either

    # the noise is the reference's: N(0, 1) * (softplus(x W_noise^T) + 0.01) added to the logits, then softmax
    gate, noise = tensor(layer, "gate", 2), tensor(layer, "noise", 2)
    torch.manual_seed(7)
    got = noisy_top_k_gates(x, gate, noise, None, training=True)
    torch.manual_seed(7)
    logits = x @ gate.T
    expected = torch.softmax(logits + torch.randn_like(logits) * (torch.log1p(torch.exp(x @ noise.T)) + 0.01), -1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(noisy_top_k_gates(x, gate, noise, None, training=False), torch.softmax(logits, -1))


def test_a_model_wrapped_in_eval_mode_keeps_a_deterministic_gate():
    model = make_tiny_vlm("llava")  # in eval mode
    peft_model = get_peft_model(model, PathWeaveConfig(r=2, modalities=["image", "audio"]))
    assert not any(m.training for m in peft_model.modules() if isinstance(m, PathWeaveLayer))
    batch = with_modalities(make_vlm_inputs(model, "llava", with_media=False), slice(2, 8))
    with torch.no_grad():
        assert torch.equal(peft_model(**batch).logits, peft_model(**batch).logits)


def test_noise_matrix_trains_and_is_saved_and_reloaded(tmp_path):
    model = make_tiny_vlm("llava")
    peft_model = get_peft_model(model, PathWeaveConfig(r=2, modalities=["image"]))
    peft_model.base_model.add_modality("audio")
    audio_batch = with_modalities(make_vlm_inputs(model, "llava", with_media=False, seed=3), slice(2, 8))
    before = snapshot(peft_model)
    train_steps(peft_model, audio_batch, steps=2)
    after = dict(peft_model.named_parameters())
    noise = [n for n in before if "pathweave_noise_1" in n]
    assert noise and all(not torch.equal(before[n], after[n]) for n in noise)  # W_noise gets gradients
    assert all(torch.equal(before[n], after[n]) for n in before if "_0." in n)  # the image stage stays frozen

    peft_model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (saved["noisy_gate"], saved["gate_top_k"], saved["in_adapter_form"]) == (True, None, "residual")
    loaded = PeftModel.from_pretrained(make_tiny_vlm("llava"), tmp_path, is_trainable=True)
    loaded_params = dict(loaded.named_parameters())
    assert all(torch.equal(p, loaded_params[n]) for n, p in peft_model.named_parameters() if "pathweave_" in n)
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == {
        n for n, p in peft_model.named_parameters() if p.requires_grad
    }  # reloaded for training: the audio stage, W_noise included, trains; the image stage stays frozen
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(**audio_batch).logits, peft_model(**audio_batch).logits)


# top-k


def test_gate_top_k_keeps_exactly_k_adapters_per_token():
    peft_model, layer = tiny_pathweave(gate_top_k=2)
    dense_model, _ = tiny_pathweave()
    kwargs, x = modality_tokens("audio", num_tokens=8)
    gate, noise = tensor(layer, "gate", 2), tensor(layer, "noise", 2)
    for training in (False, True):
        gates = noisy_top_k_gates(x, gate, noise, 2, training)  # (t, 3 adapters)
        assert ((gates > 0).sum(-1) == 2).all()
        torch.testing.assert_close(gates.sum(-1), torch.ones(8))
    logits = x @ gate.T
    top_logits, top_indices = logits.topk(2, dim=-1)
    expected = torch.zeros_like(logits).scatter(-1, top_indices, torch.softmax(top_logits, -1))
    assert torch.equal(noisy_top_k_gates(x, gate, noise, 2, False), expected)
    for too_many in (3, 5):  # k >= the number of adapters: the dense softmax, bit for bit
        assert torch.equal(noisy_top_k_gates(x, gate, noise, too_many, False), torch.softmax(logits, -1))

    peft_model.eval()
    dense_model.eval()
    with torch.no_grad():
        delta = layer._stage_delta("default", 2, x)
        outs = reference_stage_outputs(layer, 2, x, "residual")  # (t, a, o)
        torch.testing.assert_close(delta, (expected.unsqueeze(-1) * outs).sum(1), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(peft_model(x, **kwargs), dense_model(x, **kwargs))
        # the video stage has 2 adapters: top-2 keeps both, as the dense gate does
        video_kwargs, video_x = modality_tokens("video")
        assert torch.equal(peft_model(video_x, **video_kwargs), dense_model(video_x, **video_kwargs))


# the in-adapter


def reference_stage_outputs(layer: PathWeaveLayer, stage: int, x: torch.Tensor, form: str) -> torch.Tensor:
    """`(t, a, o)` outputs `s_j * up_j(m_j(down_j x))` of the stage's adapters, written token by token."""
    rows = []
    for token in x:
        outs = []
        for j in range(stage + 1):
            h = tensor(layer, "down", j) @ token
            if j < stage:
                w = tensor(layer, "inadapter", stage)[j]
                h = w @ h + tensor(layer, "inadapter_bias", stage)[j] if form == "replace" else h + w @ h
            outs.append(tensor(layer, "scale", j) * (tensor(layer, "up", j) @ h))
        rows.append(torch.stack(outs))
    return torch.stack(rows)


def test_replace_form_matches_a_hand_written_reference():
    peft_model, layer = tiny_pathweave(in_adapter_form="replace")
    peft_model.eval()
    kwargs, x = modality_tokens("audio", num_tokens=3)
    with torch.no_grad():
        got = peft_model(x, **kwargs)
    expected = []
    for token, outs in zip(x, reference_stage_outputs(layer, 2, x, "replace")):
        g = torch.softmax(tensor(layer, "gate", 2) @ token, -1)  # eval: the noise-free gate
        expected.append(layer.base_layer(token).detach() + sum(g[j] * outs[j] for j in range(3)))
    torch.testing.assert_close(got, torch.stack(expected), rtol=1e-5, atol=1e-6)

    # residual h + W h is the replace form with W' = I + W and b = 0
    residual_model, residual_layer = tiny_pathweave()
    residual_model.eval()
    with torch.no_grad():
        for stage in (1, 2):
            tensor(layer, "inadapter", stage).copy_(torch.eye(2) + tensor(residual_layer, "inadapter", stage))
            tensor(layer, "inadapter_bias", stage).zero_()
        torch.testing.assert_close(peft_model(x, **kwargs), residual_model(x, **kwargs), rtol=1e-5, atol=1e-6)


def test_replace_form_starts_from_pytorch_linear_init_and_residual_from_identity():
    r = 4
    model = make_tiny_vlm("llava")
    config = PathWeaveConfig(r=r, modalities=["image", "video", "audio"], in_adapter_form="replace")
    peft_model = get_peft_model(model, config)
    layer = next(m for m in peft_model.modules() if isinstance(m, PathWeaveLayer))
    weight, bias = tensor(layer, "inadapter", 2), tensor(layer, "inadapter_bias", 2)
    assert weight.shape == (2, r, r) and bias.shape == (2, r)
    bound = r**-0.5  # nn.Linear(r, r): weight and bias uniform in +-1/sqrt(fan_in)
    assert (weight.abs() <= bound).all() and (bias.abs() <= bound).all() and bias.abs().sum() > 0
    assert weight.std() > bound / 4  # random, not zero
    assert not hasattr(layer, "pathweave_inadapter_bias_0")

    residual = get_peft_model(make_tiny_vlm("llava"), PathWeaveConfig(r=r, modalities=["image", "video"]))
    residual_layer = next(m for m in residual.modules() if isinstance(m, PathWeaveLayer))
    assert not hasattr(residual_layer, "pathweave_inadapter_bias_1")
    assert torch.equal(tensor(residual_layer, "inadapter", 1), torch.zeros(1, r, r))


def test_replace_form_trains_only_the_current_stage_and_reloads_exactly(tmp_path):
    model = make_tiny_vlm("llava")
    image_batch = with_modalities(make_vlm_inputs(model, "llava"))
    text_batch = with_modalities(make_vlm_inputs(model, "llava", with_media=False))
    audio_batch = with_modalities(make_vlm_inputs(model, "llava", with_media=False, seed=3), slice(2, 8))
    peft_model = get_peft_model(model, PathWeaveConfig(r=4, modalities=["image"], in_adapter_form="replace"))
    train_steps(peft_model, image_batch, steps=2)
    with torch.no_grad():
        image_stage_0 = peft_model(**image_batch).logits
        text_stage_0 = peft_model(**text_batch).logits

    peft_model.base_model.add_modality("audio")
    before = snapshot(peft_model)
    train_steps(peft_model, audio_batch, steps=2)
    after = dict(peft_model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    kinds = {n.split(".")[-2] for n in changed}
    assert kinds == {f"pathweave_{kind}_1" for kind in ("down", "up", "scale", "inadapter", "inadapter_bias")} | {
        "pathweave_gate_1",
        "pathweave_noise_1",
    }
    with torch.no_grad():
        assert torch.equal(peft_model(**image_batch).logits, image_stage_0)
        assert torch.equal(peft_model(**text_batch).logits, text_stage_0)
        audio = peft_model(**audio_batch).logits

    peft_model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_tiny_vlm("llava"), tmp_path)
    assert loaded.peft_config["default"].in_adapter_form == "replace"
    loaded_params = dict(loaded.named_parameters())
    assert all(torch.equal(p, loaded_params[n]) for n, p in peft_model.named_parameters() if "pathweave_" in n)
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(**audio_batch).logits, audio)
        assert torch.equal(loaded(**image_batch).logits, image_stage_0)


# adapters saved before these options existed


def test_adapters_saved_before_the_noisy_gate_load_with_zero_noise_and_unchanged_outputs(tmp_path):
    model = make_tiny_vlm("llava")
    peft_model = get_peft_model(model, PathWeaveConfig(r=2, modalities=["image", "audio"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "pathweave_" in name and "pathweave_noise_" not in name:
                p.add_(torch.randn(p.shape) * 0.1)
    batch = with_modalities(make_vlm_inputs(model, "llava"), slice(8, 12))
    with torch.no_grad():
        expected = peft_model(**batch).logits
    peft_model.save_pretrained(tmp_path)
    # the layout of a save from before `noisy_gate` / `gate_top_k` / `in_adapter_form`: no noise tensors, no options
    weights = load_file(tmp_path / "adapter_model.safetensors")
    save_file({k: v for k, v in weights.items() if "pathweave_noise_" not in k}, tmp_path / "adapter_model.safetensors")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    for option in ("noisy_gate", "gate_top_k", "in_adapter_form"):
        del config[option]
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))

    with pytest.warns(UserWarning, match=r"without the noisy gate's noise matrices.*noisy_gate: false"):
        loaded = PeftModel.from_pretrained(make_tiny_vlm("llava"), tmp_path)
    noise = [p for n, p in loaded.named_parameters() if "pathweave_noise_1" in n]
    assert noise and all(torch.equal(p, torch.zeros_like(p)) for p in noise)
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, expected)

    config["noisy_gate"] = False  # what the warning offers: the plain softmax gate, no noise tensors expected
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    plain = PeftModel.from_pretrained(make_tiny_vlm("llava"), tmp_path)
    assert not any("pathweave_noise_" in n for n, _ in plain.named_parameters())
    plain.eval()
    with torch.no_grad():
        assert torch.equal(plain(**batch).logits, expected)


def test_a_new_save_missing_only_some_noise_tensors_is_refused(tmp_path):
    peft_model = get_peft_model(make_tiny_vlm("llava"), PathWeaveConfig(r=2, modalities=["image", "audio"]))
    peft_model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "adapter_model.safetensors")
    dropped = next(k for k in weights if "pathweave_noise_" in k)
    save_file({k: v for k, v in weights.items() if k != dropped}, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="not in the adapter"):
        PeftModel.from_pretrained(make_tiny_vlm("llava"), tmp_path)


# bad values


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"gate_top_k": 0}, r"`gate_top_k` must be None \(keep every adapter\) or a positive integer, got 0"),
        ({"gate_top_k": 1.5}, r"`gate_top_k` .* got 1\.5"),
        ({"gate_top_k": True}, r"`gate_top_k` .* got True"),
        ({"in_adapter_form": "mlp"}, r"`in_adapter_form` must be one of \('residual', 'replace'\), got 'mlp'"),
        ({"noisy_gate": "yes"}, r"`noisy_gate` must be True or False, got 'yes'"),
    ],
)
def test_bad_option_values_raise_clear_errors(options, message):
    with pytest.raises(ValueError, match=message):
        PathWeaveConfig(**options)


def test_options_do_not_leak_between_adapters():
    model = make_tiny_vlm("llava")
    peft_model = get_peft_model(model, PathWeaveConfig(r=2, modalities=["image", "audio"]))
    peft_model.add_adapter(
        "other", PathWeaveConfig(r=2, modalities=["image", "audio"], in_adapter_form="replace", noisy_gate=False)
    )
    layer = next(m for m in peft_model.modules() if isinstance(m, PathWeaveLayer))
    assert layer.pathweave_settings["default"] == (True, None, "residual")
    assert layer.pathweave_settings["other"] == (False, None, "replace")
    assert "other" in layer.pathweave_inadapter_bias_1 and "default" not in layer.pathweave_inadapter_bias_1
    assert "default" in layer.pathweave_noise_1 and "other" not in layer.pathweave_noise_1
