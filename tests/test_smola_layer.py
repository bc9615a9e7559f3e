"""SMoLA's batched mixture against a per-expert reference loop, and its routers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from peft_moextend import SMoLAConfig
from peft_moextend.call_inputs import CallInputs
from peft_moextend.modality import MODALITIES
from peft_moextend.smola import SMoLALayer
from peft_moextend.smola.router import group_softmax, group_top_k_mask


class _Host(nn.Module):
    """A bare module to attach CallInputs to (layer tests feed modality ids directly)."""

    def forward(self, x):
        return x


def make_layer(config: SMoLAConfig, in_vision_tower: bool = False, seed: int = 0) -> tuple[SMoLALayer, CallInputs]:
    torch.manual_seed(seed)
    context = CallInputs.attach(_Host())
    context.markable = frozenset(MODALITIES)  # the tests set `modality_ids` directly, as an explicit one would be
    layer = SMoLALayer(nn.Linear(16, 12), "model.vision_tower.lin" if in_vision_tower else "lin", context)
    layer.update_layer("default", config)
    with torch.no_grad():  # B starts at zero; give every expert a distinct, non-zero up projection
        layer.smola_B["default"].normal_()
        layer.smola_router["default"].normal_()
    return layer, context


def reference_delta(layer: SMoLALayer, x: torch.Tensor, modalities: torch.Tensor, config: SMoLAConfig):
    """Per-token, per-expert loop: sum over groups active for the token of gate_e * B_e A_e x."""
    a = layer.smola_A["default"].view(config.num_experts, config.r, -1)
    b = layer.smola_B["default"].view(-1, config.num_experts, config.r)
    router = layer.smola_router["default"]
    out = torch.zeros(x.shape[0], b.shape[0])
    names = ["text", "image", "video", "audio"]
    for t in range(x.shape[0]):
        start = 0
        for group, size in config.expert_groups.items():
            experts = range(start, start + size)
            start += size
            if group != "multimodal" and names.index(group) != int(modalities[t]):
                continue
            logits = torch.stack([router[e] @ x[t] for e in experts]) / config.router_temperature
            if config.router == "top_k" and config.top_k == 1:  # Switch: the chosen expert's probability
                gates = torch.softmax(logits, 0) * (torch.arange(size) == logits.argmax())
            else:
                if config.router == "top_k":
                    keep = logits.topk(config.top_k).indices
                    logits = torch.full_like(logits, float("-inf")).scatter(0, keep, logits[keep])
                gates = torch.softmax(logits, 0)
            for gate, e in zip(gates, experts):
                out[t] += gate * (b[:, e] @ (a[e] @ x[t]))
    return out * config.lora_alpha / config.r


@pytest.mark.parametrize(("router", "top_k"), [("soft", 2), ("top_k", 2), ("top_k", 1)])
def test_batched_mixture_equals_per_expert_loop(router, top_k):
    config = SMoLAConfig(
        r=3, expert_groups={"text": 2, "image": 3, "multimodal": 2}, router=router, top_k=top_k, router_temperature=2.0
    )
    layer, context = make_layer(config)
    x = torch.randn(2, 5, 16)
    modalities = torch.tensor([[0, 1, 1, 0, 2], [1, 0, 0, 3, 1]])
    context.modality_ids = modalities
    with torch.no_grad():
        delta = layer(x) - layer.base_layer(x)
        expected = reference_delta(layer, x.reshape(-1, 16), modalities.reshape(-1), config)
    torch.testing.assert_close(delta.reshape(-1, 12), expected, rtol=1e-5, atol=1e-5)


def test_tower_layers_treat_all_tokens_as_the_tower_modality():
    config = SMoLAConfig(r=2, expert_groups={"text": 2, "image": 2})
    layer, context = make_layer(config, in_vision_tower=True)
    context.modality_ids = None  # towers never look at the language model's positions
    x = torch.randn(7, 16)
    with torch.no_grad():
        delta = layer(x) - layer.base_layer(x)
        expected = reference_delta(layer, x, torch.ones(7, dtype=torch.long), config)
    torch.testing.assert_close(delta, expected, rtol=1e-5, atol=1e-5)


def test_zero_up_projections_start_as_the_base_layer():
    torch.manual_seed(0)
    layer = SMoLALayer(nn.Linear(16, 12), "lin", CallInputs.attach(_Host()))
    layer.update_layer("default", SMoLAConfig(expert_groups={"multimodal": 4}))
    x = torch.randn(3, 16)
    assert torch.equal(layer(x), layer.base_layer(x))


def test_group_softmax_and_top_k():
    logits = torch.tensor([[1.0, 2.0, 0.5, 3.0, -1.0], [0.0, 0.0, 4.0, 1.0, 1.0]])
    groups = torch.tensor([0, 0, 1, 1, 1])
    probs = group_softmax(logits, groups, 2)
    torch.testing.assert_close(probs[:, :2].sum(-1), torch.ones(2))
    torch.testing.assert_close(probs[:, 2:].sum(-1), torch.ones(2))
    torch.testing.assert_close(probs[0, 2:], torch.softmax(logits[0, 2:], 0))
    # contiguous groups (SMoLA's layout): one softmax per slice gives the same gates
    torch.testing.assert_close(group_softmax(logits, groups, 2, [2, 3]), probs, rtol=0, atol=1e-7)
    masked = logits.masked_fill(~group_top_k_mask(logits, groups, 1), float("-inf"))
    torch.testing.assert_close(group_softmax(masked, groups, 2, [2, 3]), group_softmax(masked, groups, 2))
    mask = group_top_k_mask(logits, groups, 1)
    assert mask.tolist() == [[False, True, False, True, False], [True, False, True, False, False]]
    assert group_top_k_mask(logits, groups, 2).sum(-1).tolist() == [4, 4]


@pytest.mark.parametrize("router", ["soft", "top_k"])
def test_mixture_cost_does_not_grow_with_a_loop_over_experts(router, monkeypatch):
    """The same number of matmuls for 4 and 32 experts: one rank-(e*r) LoRA plus the router, no per-expert loop."""
    import torch.nn.functional as F

    calls = []
    linear = F.linear

    def counting_linear(*args, **kwargs):
        calls.append(1)
        return linear(*args, **kwargs)

    counts = []
    for num_experts in (4, 32):
        groups = {"text": num_experts // 2, "multimodal": num_experts // 2}
        layer, context = make_layer(SMoLAConfig(r=2, expert_groups=groups, router=router, top_k=2))
        context.modality_ids = torch.zeros(1, 8, dtype=torch.long)
        calls.clear()
        monkeypatch.setattr(F, "linear", counting_linear)
        layer(torch.randn(1, 8, 16))
        monkeypatch.setattr(F, "linear", linear)
        counts.append(len(calls))
    assert counts[0] == counts[1] == 4  # base layer, router, A, B
