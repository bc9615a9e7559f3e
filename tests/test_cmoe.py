"""CMoE: tasks over time without forgetting, probe-guided expansion, the task locator, and its errors."""

from __future__ import annotations

import pytest
import torch
from conformance.cases import make_llama
from helpers import run_python, snapshot, train_steps
from peft import get_peft_model

from peft_moextend import CMoEConfig
from peft_moextend.cmoe import CMoELayer

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
    everywhere = model.base_model.add_task("mid", probe_data=[batch("mid", s) for s in range(3)])
    layers = [m for m in model.modules() if isinstance(m, CMoELayer)]
    assert len(everywhere["extended_layers"]) == len(layers) == 14
    assert all(0 < share < 1 for share in everywhere["probe_shares"].values())
    nowhere_config = CMoEConfig(r=2, experts_per_task=1, probe_threshold=1.0)
    model = get_peft_model(make_llama(), nowhere_config)
    train_task(model, "low")
    nowhere = model.base_model.add_task("mid", probe_data=[batch("mid", s) for s in range(3)])
    assert nowhere["extended_layers"] == [] and len(nowhere["probe_shares"]) == 14
    # the new task reuses the old experts through its own router; the probes left nothing behind
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("cmoe_router_1" in n for n in trainable)
    assert not any("cmoe_A_1" in n for n, _ in model.named_parameters())


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
        print(",".join(model.base_model.locate([probe])))
        """
    )
    assert torch.equal(torch.load(tmp_path / "logits.pt"), expected)
    assert out.strip().split(",") == located


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
