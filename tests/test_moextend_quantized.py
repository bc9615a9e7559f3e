"""MoExtend on bitsandbytes 4-bit / 8-bit base models (attention layers quantized) on CPU."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model, prepare_model_for_kbit_training
from tiny_models import make_inputs, make_tiny_moe
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from peft_moextend import MoExtendConfig

bnb = pytest.importorskip("bitsandbytes")


def _dequantized_reference(quantized, folder):
    """fp32 model whose quantized linears hold exactly the dequantized weights of `quantized`."""
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    modules = dict(quantized.named_modules())
    with torch.no_grad():
        for name, module in reference.named_modules():
            q = modules.get(name)
            if isinstance(q, bnb.nn.Linear4bit):
                module.weight.copy_(bnb.functional.dequantize_4bit(q.weight.data, q.weight.quant_state))
            elif isinstance(q, bnb.nn.Linear8bitLt):
                module.weight.copy_(q.weight.data.float() * q.weight.SCB.float()[:, None] / 127)
    return reference


def _adapter_grads(model, batch):
    torch.manual_seed(0)
    peft_model = get_peft_model(model, MoExtendConfig())
    with torch.no_grad():
        # New router rows start as exact copies of the source expert's row: the top-k tie between the two would be
        # broken by quantization noise. Move them apart identically in both models.
        for name, p in peft_model.named_parameters():
            if "moextend_router" in name:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    peft_model.eval()
    with torch.no_grad():
        peft_model(**batch)  # an eval forward first: on AVX512-BF16 CPUs it would repack 4-bit weights
    peft_model.train()
    peft_model(**batch).loss.backward()
    return {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("bits", [4, 8])
def test_gradients_match_the_dequantized_fp32_model(tmp_path, bits):
    model = make_tiny_moe("mixtral")
    batch = make_inputs(model, "mixtral")
    model.save_pretrained(tmp_path)
    quantization = (
        BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
        if bits == 4
        else BitsAndBytesConfig(load_in_8bit=True)
    )
    quantized = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quantization, dtype=torch.float32)
    layer_cls = bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt
    assert any(isinstance(m, layer_cls) for m in quantized.modules())
    reference = _dequantized_reference(quantized, tmp_path)
    quantized = prepare_model_for_kbit_training(quantized, use_gradient_checkpointing=False)
    expected = _adapter_grads(reference, batch)
    got = _adapter_grads(quantized, batch)
    assert got.keys() == expected.keys()
    if bits == 4:
        # 4-bit on CPU dequantizes and runs the fp32 matmul: identical gradients
        assert all(torch.allclose(got[k], expected[k], rtol=1e-5, atol=1e-7) for k in got)
        assert all(not m.support_avx512bf16_for_cpu for m in quantized.modules() if isinstance(m, layer_cls))
    else:
        # LLM.int8 also quantizes activations: gradients agree up to that error
        for k in got:
            error = (got[k] - expected[k]).norm() / expected[k].norm().clamp_min(1e-12)
            assert error < 0.05, (k, float(error))
