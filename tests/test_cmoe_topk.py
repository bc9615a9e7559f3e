"""CMoE with top-k routing inside a task: k experts per token, the shared load-balancing loss, no forgetting."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conformance.cases import make_llama, perturb_adapter
from helpers import snapshot, train_steps
from peft import PeftConfig, PeftModel, get_peft_model
from test_cmoe import batch

from peft_moextend import CMoEConfig
from peft_moextend.cmoe import CMoELayer
from peft_moextend.cmoe.router import task_gates


def test_top_k_gates_keep_exactly_k_experts_and_renormalise():
    logits = torch.randn(50, 6, generator=torch.Generator().manual_seed(0))
    for k in (1, 2, 5):
        gates, chosen = task_gates(logits, k)
        assert torch.equal((gates > 0).sum(-1), torch.full((50,), k)) and torch.equal(gates > 0, chosen)
        top = torch.softmax(logits, -1).topk(k, dim=-1)
        expected = torch.zeros_like(gates).scatter(1, top.indices, top.values / top.values.sum(-1, keepdim=True))
        torch.testing.assert_close(gates, expected)
    dense, none = task_gates(logits, None)
    assert none is None and torch.equal(dense, torch.softmax(logits, -1))
    few, _ = task_gates(logits[:, :1], 2)  # a router over fewer experts than top_k (a PGKE probe) mixes them all
    assert torch.equal(few, torch.ones(50, 1))


def _two_task_model(top_k: int | None, coef: float = 1e-3):
    """Tasks "low" then "mid", every layer extended: task 1 routes over 2 + 2 experts."""
    model = get_peft_model(make_llama(), CMoEConfig(r=2, experts_per_task=2, top_k=top_k, router_aux_loss_coef=coef))
    model.base_model.add_task("low")
    model.base_model.add_task("mid")
    return model


def test_the_layer_mixes_only_the_top_k_experts_of_the_task():
    model = _two_task_model(top_k=2)
    perturb_adapter(model, "cmoe_B_", scale=0.5)  # the routers keep their small random start: no gate underflows
    layer = next(m for m in model.modules() if isinstance(m, CMoELayer) and m.module_name.endswith("0.mlp.down_proj"))
    seen = []
    layer.register_forward_hook(lambda module, args, output: seen.append((args[0], output)))
    data = batch("mid", 0)
    with torch.no_grad():
        model(**data, task="mid")
    x, got = seen[0]
    tokens = x.reshape(-1, x.shape[-1])
    weight_a = torch.cat([layer.cmoe_A_0["default"], layer.cmoe_A_1["default"]])  # (4*r, i)
    weight_b = torch.cat([layer.cmoe_B_0["default"], layer.cmoe_B_1["default"]], dim=1)  # (o, 4*r)
    logits = tokens @ layer.cmoe_router_1["default"].T  # (t, 4)
    top = logits.topk(2, dim=-1)
    gates = torch.zeros_like(logits).scatter(1, top.indices, torch.softmax(top.values, -1))
    assert torch.equal((gates > 0).sum(-1), torch.full((tokens.shape[0],), 2))  # exactly k experts per token
    per_expert = (tokens @ weight_a.T).view(-1, 4, 2)  # (t, e, r)
    delta = torch.einsum("te,ter,oer->to", gates, per_expert, weight_b.view(-1, 4, 2)) * (16.0 / 2)
    expected = layer.base_layer(tokens) + delta
    torch.testing.assert_close(got.reshape(-1, got.shape[-1]), expected, rtol=1e-5, atol=1e-6)
    record = layer.routing_records["default/task1"]
    assert torch.equal(record.dispatch_mask, gates > 0)


def test_aux_loss_is_returned_and_added_and_the_router_gets_gradients():
    model = _two_task_model(top_k=1, coef=0.5)
    perturb_adapter(model, "cmoe_B_", scale=0.5)  # non-zero experts: the task loss reaches the router too
    model.train()
    data = batch("mid", 0)
    outputs = model(**data)
    assert outputs.router_aux_loss.ndim == 0 and outputs.router_aux_loss > 0
    labels = data["labels"][:, 1:].reshape(-1)
    task_loss = F.cross_entropy(outputs.logits[:, :-1].reshape(-1, outputs.logits.shape[-1]), labels)
    torch.testing.assert_close(outputs.loss, task_loss + 0.5 * outputs.router_aux_loss)
    outputs.loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if "cmoe_router" in n}
    trained = [n for n in grads if "cmoe_router_1" in n]
    assert len(trained) == 14 and all(grads[n] is not None and grads[n].abs().sum() > 0 for n in trained)
    assert all(grads[n] is None for n in grads if "cmoe_router_0" in n)  # the earlier task's router is frozen
    dense = _two_task_model(top_k=None)
    dense.train()
    assert "router_aux_loss" not in dense(**data)  # dense routing (the default) has no aux loss


def test_earlier_tasks_stay_bit_identical_after_a_new_top_k_task():
    model = get_peft_model(make_llama(), CMoEConfig(r=2, experts_per_task=2, top_k=1))
    outputs = {}
    for index, task in enumerate(("low", "mid", "high")):
        data = [batch(task, seed) for seed in range(3)]
        model.base_model.add_task(task, probe_data=data)  # PGKE probes route top-k too (1 expert + old ones)
        before = snapshot(model)
        train_steps(model, data[0], steps=3)
        changed = {n for n, p in snapshot(model).items() if n in before and not torch.equal(before[n], p)}
        assert changed and all(f"_{index}." in n for n in changed), changed
        with torch.no_grad():
            for old, logits in outputs.items():
                assert torch.equal(model(**batch(old, 99), task=old).logits, logits), old
            outputs[task] = model(**batch(task, 99), task=task).logits


def test_top_k_adapter_saves_and_reloads_exactly(tmp_path):
    model = _two_task_model(top_k=1, coef=0.25)
    perturb_adapter(model, "cmoe_", scale=0.5)
    data = batch("low", 3)
    with torch.no_grad():
        expected = {task: model(**data, task=task).logits for task in ("low", "mid")}
        with model.disable_adapter():
            assert not torch.allclose(model(**data).logits, expected["mid"], atol=1e-4)
    model.save_pretrained(tmp_path)
    config = PeftConfig.from_pretrained(tmp_path)
    assert (config.top_k, config.router_aux_loss_coef) == (1, 0.25)
    loaded = PeftModel.from_pretrained(make_llama(), tmp_path)
    assert loaded.peft_config["default"].top_k == 1
    with torch.no_grad():
        for task, logits in expected.items():
            assert torch.equal(loaded(**data, task=task).logits, logits), task


@pytest.mark.parametrize("top_k", [0, -1, 1.5, True, "2"])
def test_bad_top_k_names_the_option(top_k):
    with pytest.raises(ValueError, match=r"`top_k` must be None \(dense routing\) or a positive integer"):
        CMoEConfig(top_k=top_k)


def test_top_k_above_experts_per_task_is_refused():
    with pytest.raises(ValueError, match=r"`top_k` \(3\) must not exceed `experts_per_task` \(2\).*Lower `top_k`"):
        get_peft_model(make_llama(), CMoEConfig(experts_per_task=2, top_k=3))
    with pytest.raises(ValueError, match="router_aux_loss_coef"):
        CMoEConfig(top_k=1, router_aux_loss_coef=-1.0)
