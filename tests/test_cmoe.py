"""CMoE: tasks over time without forgetting, probe-guided expansion, the task locator, and its errors."""

from __future__ import annotations

import pytest
import torch
from conformance.cases import make_llama
from helpers import run_python, snapshot, train_steps
from peft import get_peft_model

from peft_moextend import CMoEConfig
from peft_moextend.cmoe import CMoELayer
from peft_moextend.cmoe.model import probe_extends

# three synthetic tasks whose inputs come from disjoint token ranges
TASKS = {"low": (3, 40), "mid": (40, 80), "high": (80, 127)}


def batch(task: str, seed: int, size: int = 4) -> dict[str, torch.Tensor]:
    input_ids = torch.randint(*TASKS[task], (size, 12), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}


def train_task(model, task: str, probe: bool = False, steps: int = 3) -> dict:
    data = [batch(task, seed) for seed in range(4)]
    info = model.base_model.add_task(task, probe_data=data if probe else None)
    train_steps(model, data[0], steps=steps)
    return info


@pytest.mark.parametrize("locator", ["vae", "gaussian"])
def test_three_tasks_no_forgetting_and_locator(locator):
    model = get_peft_model(make_llama(), CMoEConfig(r=2, experts_per_task=2, locator=locator, locator_epochs=150))
    outputs = {}
    for index, task in enumerate(TASKS):
        data = [batch(task, seed) for seed in range(4)]
        model.base_model.add_task(task, probe_data=data if index else None)
        before = snapshot(model)
        train_steps(model, data[0], steps=3)
        after = snapshot(model)
        changed = {n for n in before if n in after and not torch.equal(before[n], after[n])}
        assert changed and all(f"_{index}." in n for n in changed), changed  # only the new task's tensors train
        model.base_model.fit_locator(task, [batch(task, seed) for seed in range(8)])
        model.eval()
        with torch.no_grad():
            for old, logits in outputs.items():  # earlier tasks: bit-identical after the new task
                assert torch.equal(model(**batch(old, 99), task=old).logits, logits), old
            outputs[task] = model(**batch(task, 99), task=task).logits
    held_out = {task: model.base_model.locate([batch(task, 100 + s) for s in range(4)]) for task in TASKS}
    accuracy = sum(p == t for t, preds in held_out.items() for p in preds) / sum(map(len, held_out.values()))
    assert accuracy >= 0.8, held_out
    with torch.no_grad():  # without a task, each sample goes to the located task's router
        mixed = {k: torch.cat([batch("low", 99)[k][:2], batch("high", 99)[k][:2]]) for k in ("input_ids",)}
        located = model.base_model.locate([mixed])
        by_task = model(**mixed, task=located).logits
        assert torch.equal(model(**mixed).logits, by_task)


def test_probes_decide_where_experts_go():
    model = get_peft_model(make_llama(), CMoEConfig(r=2, experts_per_task=1, probe_threshold=0.0))
    train_task(model, "low")
    info = model.base_model.add_task("mid", probe_data=[batch("mid", s) for s in range(3)])
    layers = [m for m in model.modules() if isinstance(m, CMoELayer)]
    assert len(info["probe_shares"]) == len(layers) == 14
    assert set(info["chance_shares"].values()) == {0.5}  # one old expert + the probe
    # threshold 0: exactly the layers where the trained probe is used more than chance
    assert info["extended_layers"] == sorted(k for k, share in info["probe_shares"].items() if share > 0.5)
    nowhere_config = CMoEConfig(r=2, experts_per_task=1, probe_threshold=1.0)
    model = get_peft_model(make_llama(), nowhere_config)
    train_task(model, "low")
    nowhere = model.base_model.add_task("mid", probe_data=[batch("mid", s) for s in range(3)])
    assert nowhere["extended_layers"] == [] and len(nowhere["probe_shares"]) == 14
    # the new task reuses the old experts through its own router; the probes left nothing behind
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("cmoe_router_1" in n for n in trainable)
    assert not any("cmoe_A_1" in n for n, _ in model.named_parameters())


def test_an_untrained_probe_extends_no_layer():
    """An untrained probe takes exactly its uniform share; a fixed share threshold (0.2) would have extended every
    layer with two old experts (uniform share 1/3)."""
    model = get_peft_model(make_llama(), CMoEConfig(r=2, experts_per_task=2, probe_learning_rate=1e-30))
    train_task(model, "low")
    info = model.base_model.add_task("mid", probe_data=[batch("mid", s) for s in range(3)])
    assert all(abs(share - 1 / 3) < 1e-6 for share in info["probe_shares"].values())
    assert info["extended_layers"] == []
    assert probe_extends(0.9, 1 / 3, 0.2) and not probe_extends(0.4, 1 / 3, 0.2) and probe_extends(0.0, 1.0, 0.2)


def test_generate_keeps_the_task_for_every_decoding_step():
    model = get_peft_model(make_llama(), CMoEConfig(r=2, locator="gaussian"))
    for task in ("low", "high"):
        train_task(model, task)
        model.base_model.fit_locator(task, [batch(task, s) for s in range(4)])
    model.eval()
    prompt = batch("low", 7, size=2)
    seen = []
    layer = next(m for m in model.modules() if isinstance(m, CMoELayer) and m.cmoe_is_locator.get("default"))
    layer.register_forward_hook(lambda m, a, o: seen.append(m.task_selection.latest("default").clone()))
    model.generate(
        input_ids=prompt["input_ids"],
        attention_mask=prompt["attention_mask"],
        max_new_tokens=3,
        do_sample=False,
        task="high",
    )
    assert len(seen) == 3 and all(ids.tolist() == [1, 1] for ids in seen)


def test_errors_name_the_problem():
    model = get_peft_model(make_llama(), CMoEConfig(r=2))
    model.train()
    with pytest.raises(ValueError, match=r"no task yet.*add_task"):
        model(**batch("low", 0))
    train_task(model, "low")
    with pytest.raises(ValueError, match="already exists"):
        model.base_model.add_task("low")
    train_task(model, "mid")
    model.eval()
    with pytest.raises(ValueError, match=r"locator is not fitted for \['low', 'mid'\].*fit_locator"):
        model(**batch("low", 0))
    with pytest.raises(ValueError, match=r"`task` must be one of \['low', 'mid'\]"):
        model(**batch("low", 0), task="other")
    with pytest.raises(ValueError, match="Unknown task"):
        model.base_model.fit_locator("other", [batch("low", 0)])
    with pytest.raises(ValueError, match="probe_threshold"):
        CMoEConfig(probe_threshold=2.0)
    with pytest.raises(ValueError, match="locator"):
        CMoEConfig(locator="knn")


def test_whole_continual_state_reloads_in_a_fresh_process(tmp_path):
    model = get_peft_model(make_llama(), CMoEConfig(r=2, experts_per_task=1, locator="vae", locator_epochs=100))
    for index, task in enumerate(("low", "high")):
        train_task(model, task, probe=index > 0)
        model.base_model.fit_locator(task, [batch(task, s) for s in range(4)])
    model.eval()
    probe = {k: torch.cat([batch("low", 5)[k][:2], batch("high", 5)[k][:2]]) for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        expected = model(**probe).logits
    located = model.base_model.locate([probe])
    model.save_pretrained(tmp_path / "adapter")
    from safetensors.torch import load_file

    assert all(".cmoe_" in key for key in load_file(tmp_path / "adapter" / "adapter_model.safetensors"))
    torch.save(probe, tmp_path / "probe.pt")
    out = run_python(
        f"""
        import torch, peft_moextend
        from peft import PeftModel
        from conformance.cases import make_llama
        model = PeftModel.from_pretrained(make_llama(), "{tmp_path / "adapter"}")
        probe = torch.load("{tmp_path / "probe.pt"}")
        with torch.no_grad():
            torch.save(model(**probe).logits, "{tmp_path / "logits.pt"}")
        print(",".join(map(str, model.base_model.locate([probe]))))
        """
    )
    assert torch.equal(torch.load(tmp_path / "logits.pt"), expected)
    assert out.strip().split(",") == [str(name) for name in located]


def test_second_adapter_on_other_layers_resolves_its_own_tasks():
    """Each adapter's first layer resolves its tasks (the locator layer is per adapter, not the model's first)."""
    model = get_peft_model(make_llama(), CMoEConfig(r=2, experts_per_task=1, target_modules=["q_proj"]))
    model.base_model.add_task("a")
    model.add_adapter("other", CMoEConfig(r=2, experts_per_task=1, target_modules=["down_proj"]))
    model.set_adapter("other")
    model.base_model.add_task("b", adapter_name="other")
    model.base_model.add_task("c", adapter_name="other")
    data = batch("low", 0)
    train_steps(model, data, steps=2)  # trains task "c" of "other"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("down_proj" in n and ".other" in n and "_1." in n for n in trainable)
    model.eval()
    with torch.no_grad():
        as_b, as_c = (model(**data, task=name).logits for name in ("b", "c"))
        mixed = model(**data, task=["b", "c", "b", "c"]).logits
        with pytest.raises(ValueError, match="locator is not fitted"):
            model(**data)  # two tasks, no task id and no fitted locator: a clear error
    assert not torch.allclose(as_b, as_c)
    torch.testing.assert_close(mixed[0::2], as_b[0::2])
    torch.testing.assert_close(mixed[1::2], as_c[1::2])
    layers = [m for m in model.modules() if isinstance(m, CMoELayer)]
    assert [m.module_name.endswith("q_proj") for m in layers if m.cmoe_is_locator.get("default")] == [True]
    assert [m.module_name.endswith("down_proj") for m in layers if m.cmoe_is_locator.get("other")] == [True]
    model.delete_adapter("default")
    assert all("default" not in m.cmoe_settings and "default" not in m.cmoe_is_locator for m in layers)


def test_restricted_to_images_text_keeps_the_base_computation_whatever_the_task():
    from conformance.cases import perturb_adapter
    from tiny_vlms import make_tiny_vlm, make_vlm_inputs

    model = make_tiny_vlm("llava")
    image_batch = make_vlm_inputs(model, "llava")
    text_batch = make_vlm_inputs(model, "llava", with_media=False)
    with torch.no_grad():
        text_base, image_base = model(**text_batch).logits, model(**image_batch).logits
    config = CMoEConfig(r=2, restrict_to_modalities=["image"], tasks=[{"name": "a", "layers": None}])
    peft_model = get_peft_model(model, config)
    peft_model.base_model.add_task("b")
    perturb_adapter(peft_model, "cmoe_", scale=0.5)
    first_image = int((image_batch["input_ids"][0] == model.config.image_token_index).nonzero()[0])
    with torch.no_grad():
        for task in ("a", "b"):
            assert torch.equal(peft_model(**text_batch, task=task).logits, text_base)
            logits = peft_model(**image_batch, task=task).logits
            assert torch.equal(logits[:, :first_image], image_base[:, :first_image])
            assert not torch.allclose(logits[:, first_image:], image_base[:, first_image:], atol=1e-4)
    with pytest.raises(ValueError, match="restrict_to_modalities"):
        CMoEConfig(restrict_to_modalities=[])


@pytest.mark.parametrize("locator", ["vae", "gaussian", "mahalanobis"])
def test_inputs_no_task_claims_take_the_base_path(locator):
    model = get_peft_model(make_llama(), CMoEConfig(r=2, experts_per_task=1, locator=locator, locator_epochs=150))
    for task in ("low", "high"):
        train_task(model, task)
        info = model.base_model.fit_locator(task, [batch(task, s, size=16) for s in range(4)])
        assert info["threshold"] is not None
    model.eval()
    held_out = {task: [batch(task, 50 + s, size=16) for s in range(2)] for task in ("low", "high")}
    for task, batches in held_out.items():
        located = model.base_model.locate(batches)
        assert sum(name != task for name in located) <= 1, located  # at most 1 of 32 held-out inputs missed
    # inputs unlike any task's: all the same token (no task saw that); they take the base path, bit-identically
    foreign = {"input_ids": torch.full((4, 12), 77), "attention_mask": torch.ones(4, 12, dtype=torch.long)}
    assert model.base_model.locate([foreign]) == [None] * 4
    with torch.no_grad():
        adapted = model(**foreign).logits
        with model.disable_adapter():
            assert torch.equal(model(**foreign).logits, adapted)


def test_fitting_the_locator_stops_each_forward_at_the_first_layer():
    model = get_peft_model(make_llama(), CMoEConfig(r=2, locator="gaussian"))
    train_task(model, "low")
    reached = []
    model.base_model.model.lm_head.register_forward_hook(lambda *args: reached.append(1))
    model.base_model.fit_locator("low", [batch("low", s) for s in range(3)])
    assert not reached


def test_by_modality_features_pool_text_and_media_tokens_apart():
    from tiny_vlms import make_tiny_vlm, make_vlm_inputs

    model = get_peft_model(make_tiny_vlm("llava"), CMoEConfig(r=2, locator="gaussian", locator_features="by_modality"))
    model.base_model.add_task("images")
    image_batches = [make_vlm_inputs(model.get_base_model(), "llava", batch_size=8, seed=s) for s in range(4)]
    model.base_model.fit_locator("images", image_batches)
    layer = model.base_model._locator_layer("default")
    # mean and log-std of: text mean, media mean, media share
    assert layer.cmoe_locator_0["default"].numel() == 2 * (2 * layer.in_features + 1)
    text_only = make_vlm_inputs(model.get_base_model(), "llava", with_media=False)
    assert model.base_model.locate([text_only]) == [None, None]  # no media: not the image task's input
    assert model.base_model.locate([make_vlm_inputs(model.get_base_model(), "llava", seed=9)]) == ["images"] * 2
