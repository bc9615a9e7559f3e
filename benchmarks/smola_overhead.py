"""Training-step time and peak memory of SMoLA vs plain PEFT LoRA of rank E*r, and vs a naive per-expert loop.

Mid-size Llama config that fits 2 CPU cores (hidden 512, 4 layers, seq 256). SMoLA with E experts of rank r (one
soft "multimodal" group, the paper's core) is compared with LoRA of rank E*r on the same target modules, measured in
the same run; the naive variant computes the same mixture with a Python loop over experts. Each variant runs in its
own process so that peak RSS is its own. Target: SMoLA / LoRA(rank E*r) <= 1.2 for the training step.

    python benchmarks/smola_overhead.py [--experts 8 32] [--rank 4] [--steps 5]
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from common import add_size_arguments, build_llama, in_subprocess, measure_steps


def naive_forward(self, x, *args, **kwargs):
    """SMoLALayer.forward written the slow way: one small LoRA per expert, in a Python loop."""
    result = self.base_layer(x, *args, **kwargs)
    adapter = self.active_adapters[0]
    settings = self.smola_settings[adapter]
    tokens = x.reshape(-1, x.shape[-1])
    gates = torch.softmax(F.linear(tokens, self.smola_router[adapter]) / settings.temperature, dim=-1)
    weight_a = self.smola_A[adapter].view(gates.shape[-1], settings.rank, -1)
    weight_b = self.smola_B[adapter].view(-1, gates.shape[-1], settings.rank)
    delta = 0
    for expert in range(gates.shape[-1]):
        delta = delta + gates[:, expert : expert + 1] * F.linear(
            F.linear(tokens, weight_a[expert]), weight_b[:, expert]
        )
    return result + (delta * settings.scaling).reshape(*x.shape[:-1], -1)


def run_variant(variant: str, experts: int, args: argparse.Namespace) -> dict:
    from peft import LoraConfig, get_peft_model

    import peft_moextend
    from peft_moextend.smola import SMoLALayer

    torch.set_num_threads(args.threads)
    model = build_llama(args.hidden, args.layers, args.seq, args.vocab)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    if variant == "lora":
        peft_config = LoraConfig(r=experts * args.rank, lora_alpha=2 * experts * args.rank, target_modules=targets)
    else:
        peft_config = peft_moextend.SMoLAConfig(
            r=args.rank, expert_groups={"multimodal": experts}, target_modules=targets
        )
    model = get_peft_model(model, peft_config)
    if variant == "naive_loop":
        SMoLALayer.forward = naive_forward
    batch = {"input_ids": torch.randint(0, args.vocab, (args.batch, args.seq))}
    batch["labels"] = batch["input_ids"]
    return measure_steps(model, batch, args.steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--rank", type=int, default=4)
    add_size_arguments(parser)
    args = parser.parse_args()

    print(
        f"Llama hidden={args.hidden} layers={args.layers}, batch={args.batch} seq={args.seq}, all 7 projections "
        f"targeted, {args.threads} threads, median of {args.steps} training steps"
    )
    print(f"{'E':>3} {'variant':<24}{'step (s)':>10}{'/ LoRA':>8}{'peak extra MiB':>16}{'/ LoRA':>8}{'trainable':>12}")
    results = {}
    for experts in args.experts:
        rows = {v: in_subprocess(run_variant, v, experts, args) for v in ("lora", "smola", "naive_loop")}
        results[experts] = rows
        lora = rows["lora"]
        names = {
            "lora": f"LoRA r={experts * args.rank}",
            "smola": f"SMoLA {experts}x r={args.rank}",
            "naive_loop": "naive per-expert loop",
        }
        for variant, r in rows.items():
            print(
                f"{experts:>3} {names[variant]:<24}{r['step_s']:>10.3f}{r['step_s'] / lora['step_s']:>8.2f}"
                f"{r['peak_extra_mib']:>16.0f}{r['peak_extra_mib'] / max(lora['peak_extra_mib'], 1):>8.2f}"
                f"{r['trainable']:>12,}"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
