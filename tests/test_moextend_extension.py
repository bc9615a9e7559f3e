"""The extension stage: expert usage, layer ranking by usage shift, and initialisation from data."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from tiny_models import make_inputs, make_tiny_moe

from peft_moextend import MoExtendConfig, measure_expert_usage, plan_extension, tune_routers_and_plan
from peft_moextend.moextend import MoExtendLayer


def batches(model, family, n=3, **kwargs):
    return [make_inputs(model, family, seed=i, **kwargs) for i in range(n)]


@pytest.mark.parametrize("family", ["mixtral", "llama4", "llava_mixtral"])
def test_usage_is_a_distribution_per_layer(family):
    model = make_tiny_moe(family)
    usage = measure_expert_usage(model, batches(model, family))
    assert sorted(usage) == [0, 1]
    for fractions in usage.values():
        assert fractions.shape == (4,) and torch.isclose(fractions.sum(), torch.tensor(1.0))
        assert (fractions > 0).sum() >= 2  # top-2 routing reaches at least two experts


@pytest.mark.parametrize("family", ["mixtral", "llama4"])  # (LLaVA's output has no router_logits field)
def test_usage_matches_the_models_own_router_logits(family):
    model = make_tiny_moe(family)
    data = batches(model, family)
    out = model(**{k: v for k, v in data[0].items() if k != "labels"}, output_router_logits=True)
    for layer, logits in enumerate(out.router_logits):
        counts = torch.bincount(logits.topk(2).indices.flatten(), minlength=4).float()
        torch.testing.assert_close(measure_expert_usage(model, data[:1])[layer], counts / counts.sum())


def test_padding_tokens_are_not_counted():
    model = make_tiny_moe("mixtral")
    batch = make_inputs(model, "mixtral")
    half = batch["attention_mask"].clone()
    half[:, 6:] = 0
    trimmed = {k: v[:, :6] for k, v in batch.items()}
    torch.testing.assert_close(
        measure_expert_usage(model, [{**batch, "attention_mask": half}])[0],
        measure_expert_usage(model, [trimmed])[0],
    )


def test_plan_picks_the_layers_with_the_largest_usage_shift_and_the_most_used_expert():
    before = {
        0: torch.tensor([0.25, 0.25, 0.25, 0.25]),
        1: torch.tensor([0.4, 0.2, 0.2, 0.2]),
        2: torch.tensor([0.25, 0.25, 0.25, 0.25]),
        3: torch.tensor([0.1, 0.1, 0.4, 0.4]),
    }
    after = {
        0: torch.tensor([0.26, 0.24, 0.25, 0.25]),
        1: torch.tensor([0.1, 0.1, 0.7, 0.1]),
        2: torch.tensor([0.05, 0.05, 0.1, 0.8]),
        3: torch.tensor([0.1, 0.1, 0.41, 0.39]),
    }
    plan = plan_extension(before, after, fraction=0.5)
    assert plan.layers == [1, 2]
    assert plan.source_experts == {1: 2, 2: 3}
    assert plan.usage_shift[2] > plan.usage_shift[1] > plan.usage_shift[3] > plan.usage_shift[0]
    with pytest.raises(ValueError, match="fraction"):
        plan_extension(before, after, fraction=0)


def test_router_tuning_stage_restores_the_model_and_feeds_the_config():
    model = make_tiny_moe("qwen3_moe")
    data = batches(model, "qwen3_moe", n=4)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    plan = tune_routers_and_plan(model, data, steps=4, learning_rate=5e-2, fraction=0.5)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    assert len(plan.layers) == 1 and set(plan.usage_shift) == {0, 1}
    assert max(plan.usage_shift.values()) > 0

    peft_model = get_peft_model(model, MoExtendConfig(target_layers=plan.layers, expert_init=plan.source_experts))
    (layer,) = [m for m in peft_model.modules() if isinstance(m, MoExtendLayer)]
    source = plan.source_experts[layer.layer_index]
    assert torch.equal(layer.moextend_gate_up_proj["default"][0], layer.base_layer.experts.gate_up_proj[source])
    assert torch.equal(layer.moextend_router["default"][0], layer.base_layer.gate.weight[source])


def test_init_new_experts_from_data_copies_each_layers_most_used_expert():
    model = make_tiny_moe("mixtral")
    data = batches(model, "mixtral")
    usage = measure_expert_usage(model, data)
    peft_model = get_peft_model(model, MoExtendConfig(num_new_experts=2))
    sources = peft_model.base_model.init_new_experts_from_data(data)
    assert sources == {i: int(u.argmax()) for i, u in usage.items()}
    assert peft_model.peft_config["default"].expert_init == sources
    for layer in (m for m in peft_model.modules() if isinstance(m, MoExtendLayer)):
        expert = sources[layer.layer_index]
        for k in range(2):
            assert torch.equal(layer.moextend_down_proj["default"][k], layer.base_layer.experts.down_proj[expert])
