"""Small helpers shared by the tests."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from torch import nn

REPO_ROOT = Path(__file__).resolve().parent.parent


def run_python(code: str, cwd: Path | None = None) -> str:
    """Run `code` in a fresh Python process (tests/ on the path); returns stdout, raises with stderr on failure."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=cwd or REPO_ROOT,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": f"{REPO_ROOT / 'tests'}:{REPO_ROOT}", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
        timeout=300,
    )
    if result.returncode != 0:
        raise AssertionError(f"subprocess failed:\n{result.stderr[-4000:]}")
    return result.stdout


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copy of every parameter, by name."""
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def train_steps(model: nn.Module, batch: dict, steps: int = 3, lr: float = 1e-2) -> list[float]:
    """A few AdamW steps on the trainable parameters; returns the losses."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    return losses


def load_quantized_with_reference(folder: Path, bits: int):
    """The model saved in `folder` loaded in bitsandbytes `bits`-bit, and an fp32 copy whose quantized linears hold
    exactly the dequantized weights (what the quantized model computes with), on the quantized model's device
    (CUDA where there is a GPU)."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = (
        BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
        if bits == 4
        else BitsAndBytesConfig(load_in_8bit=True)
    )
    quantized = AutoModelForCausalLM.from_pretrained(folder, quantization_config=quantization, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(quantized.device)
    quantized_modules = dict(quantized.named_modules())
    with torch.no_grad():
        for name, module in reference.named_modules():
            q = quantized_modules.get(name)
            if isinstance(q, bnb.nn.Linear4bit):
                module.weight.copy_(bnb.functional.dequantize_4bit(q.weight.data, q.weight.quant_state))
            elif isinstance(q, bnb.nn.Linear8bitLt):
                module.weight.copy_(q.weight.data.float() * q.weight.SCB.float()[:, None] / 127)
    return quantized, reference
