"""Small helpers shared by the tests."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from torch import nn

REPO_ROOT = Path(__file__).resolve().parent.parent


def child_env(**overrides: str) -> dict[str, str]:
    """Environment for a child process: the parent's whole environment (variables such as `OPENBLAS_*` are set on
    some machines for correctness and must reach the child), tests/ and the repository on `PYTHONPATH`, offline
    Hub, and the parent's torch thread count, so that bit-exact comparisons run under identical settings (another
    thread count changes the order of matmul reductions, hence the last bits, on some CPUs)."""
    threads = str(torch.get_num_threads())
    paths = (str(REPO_ROOT / "tests"), str(REPO_ROOT), os.environ.get("PYTHONPATH"))
    python_path = os.pathsep.join(p for p in paths if p)
    return {
        **os.environ,
        "PYTHONPATH": python_path,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": threads,
        "MKL_NUM_THREADS": threads,
        **overrides,
    }


def run_command(command: list[str], cwd: Path | None = None, timeout: int = 600, **env: str) -> str:
    """Run `command` in a child process with `child_env(**env)`; returns stdout, raises with stderr on failure."""
    result = subprocess.run(
        command, cwd=cwd or REPO_ROOT, capture_output=True, text=True, env=child_env(**env), timeout=timeout
    )
    if result.returncode != 0:
        raise AssertionError(f"subprocess {command[:3]} failed (exit {result.returncode}):\n{result.stderr[-4000:]}")
    return result.stdout


def run_python(code: str, cwd: Path | None = None) -> str:
    """Run `code` in a fresh Python process (see `child_env`), with the parent's torch thread count set before the
    code runs; returns stdout, raises with stderr on failure."""
    preamble = f"import torch\ntorch.set_num_threads({torch.get_num_threads()})\n"
    return run_command([sys.executable, "-c", preamble + textwrap.dedent(code)], cwd=cwd, timeout=300)


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
    """The model saved in `folder` loaded in bitsandbytes `bits`-bit (4-bit: fused MoE experts too, as
    `get_peft_model` stores them), and an fp32 copy whose quantized weights hold exactly the dequantized values (what
    the quantized model computes with), on the quantized model's device (CUDA where there is a GPU)."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from peft_moextend import quantize_moe_experts

    quantization = (
        BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
        if bits == 4
        else BitsAndBytesConfig(load_in_8bit=True)
    )
    quantized = AutoModelForCausalLM.from_pretrained(folder, quantization_config=quantization, dtype=torch.float32)
    if bits == 4:  # what get_peft_model does to a 4-bit base's fused MoE experts (no-op for dense models)
        quantize_moe_experts(quantized, quant_type=quantization.bnb_4bit_quant_type)
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(quantized.device)
    quantized_modules = dict(quantized.named_modules())
    with torch.no_grad():
        for name, module in reference.named_modules():
            q = quantized_modules.get(name)
            if isinstance(q, bnb.nn.Linear4bit):
                module.weight.copy_(bnb.functional.dequantize_4bit(q.weight.data, q.weight.quant_state))
            elif isinstance(q, bnb.nn.Linear8bitLt):
                module.weight.copy_(q.weight.data.float() * q.weight.SCB.float()[:, None] / 127)
            elif hasattr(q, "parametrizations"):  # 4-bit fused experts
                for tensor in q.parametrizations:
                    getattr(module, tensor).copy_(getattr(q, tensor))
    return quantized, reference
