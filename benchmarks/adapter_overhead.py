"""Training-step time and peak memory of ModeX and PathWeave vs plain PEFT LoRA with the same number of trainable
parameters on the same target modules, measured in the same run.

Mid-size Llama config that fits 2 CPU cores (hidden 512, 4 layers, seq 256). All tokens are text, and both methods
are configured so that every token takes their path (ModeX: a text expert and a cross-modal expert; PathWeave: a
"text" stage), i.e. the full cost. Each variant runs in its own process.

    python benchmarks/adapter_overhead.py [--steps 5]
"""

from __future__ import annotations

import argparse
import json

import torch
from common import add_size_arguments, build_llama, in_subprocess, measure_steps

ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(args: argparse.Namespace):
    return build_llama(args.hidden, args.layers, args.seq, args.vocab)


def method_config(method: str):
    import peft_moextend

    if method == "modex":
        return peft_moextend.ModeXConfig(experts={"text": ["text"], "cross_modal": None}), ["o_proj", "down_proj"]
    return peft_moextend.PathWeaveConfig(r=8, modalities=["text"]), ALL_PROJECTIONS


def run_variant(method: str, variant: str, args: argparse.Namespace) -> dict:
    from peft import LoraConfig, get_peft_model

    torch.set_num_threads(args.threads)
    model = build(args)
    config, targets = method_config(method)
    if variant == "lora":
        reference = get_peft_model(build(args), config)
        trainable = sum(p.numel() for p in reference.parameters() if p.requires_grad)
        per_rank = sum(
            m.in_features + m.out_features for n, m in build(args).named_modules() if n.rsplit(".", 1)[-1] in targets
        )
        rank = max(1, round(trainable / per_rank))
        model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets))
    else:
        model = get_peft_model(model, config)
    batch = {"input_ids": torch.randint(0, args.vocab, (args.batch, args.seq))}
    batch["labels"] = batch["input_ids"]
    return measure_steps(model, batch, args.steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_size_arguments(parser)
    args = parser.parse_args()
    print(
        f"Llama hidden={args.hidden} layers={args.layers}, batch={args.batch} seq={args.seq}, {args.threads} threads, "
        f"median of {args.steps} training steps"
    )
    print(
        f"{'method':<12}{'step (s)':>10}{'LoRA (s)':>10}{'/ LoRA':>8}{'peak MiB / LoRA':>17}{'trainable':>12}"
        f"{'LoRA trainable':>16}"
    )
    results = {}
    for method in ("modex", "pathweave"):
        ours, lora = (in_subprocess(run_variant, method, v, args) for v in ("ours", "lora"))
        results[method] = {"ours": ours, "lora": lora}
        print(
            f"{method:<12}{ours['step_s']:>10.3f}{lora['step_s']:>10.3f}{ours['step_s'] / lora['step_s']:>8.2f}"
            f"{ours['peak_extra_mib'] / max(lora['peak_extra_mib'], 1):>17.2f}{ours['trainable']:>12,}"
            f"{lora['trainable']:>16,}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
