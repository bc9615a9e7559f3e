"""Training-step time and peak memory of MoExtend vs the base MoE model, measured in the same run.

Mid-size Mixtral config that fits 2 CPU cores. Each variant runs in its own process so that peak RSS is its own.
Baselines: the base MoE model's forward alone, and a training step of the base model that trains only its routers
(the paper's stage 2, the cheapest training that backpropagates through every layer). The extended model trains
only the added parameters; its new experts run only on the tokens routed to them. `moextend_stages` is the same
adapter grown by `add_stage` to `--stages` stages of `--new-experts` experts each (task extension), training the last
stage: the cost of routing over every stage with one batched call per stage.

    python benchmarks/moextend_overhead.py [--steps 5] [--hidden 512] [--layers 4] [--seq 256] [--batch 4] [--stages 4]
"""

from __future__ import annotations

import argparse
import json

import torch
from common import add_size_arguments, in_subprocess, measure_steps


def build(args: argparse.Namespace):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=4,
        num_local_experts=args.experts,
        num_experts_per_tok=2,
        max_position_embeddings=args.seq,
    )
    model = MixtralForCausalLM._from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(0.0, 0.5)
    return model


def run_variant(variant: str, args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    model = build(args)
    if variant.startswith("moextend"):
        from peft import get_peft_model

        import peft_moextend

        model = get_peft_model(model, peft_moextend.MoExtendConfig(num_new_experts=args.new_experts))
        for stage in range(1, args.stages if variant == "moextend_stages" else 1):
            model.base_model.add_stage(f"task_{stage}")
    elif variant == "base_train_routers":
        for name, p in model.named_parameters():
            p.requires_grad_(name.endswith("mlp.gate.weight"))
    batch = {"input_ids": torch.randint(0, args.vocab, (args.batch, args.seq))}
    batch["labels"] = batch["input_ids"]
    result = measure_steps(model, batch, args.steps, train=variant != "base_forward")
    if variant.startswith("moextend"):
        from peft_moextend.moextend import MoExtendLayer

        records = [m.routing_records["default"] for m in model.modules() if isinstance(m, MoExtendLayer)]
        slots = sum(int(r.dispatch_mask.sum()) for r in records)
        result["new_expert_slot_fraction"] = sum(int(r.dispatch_mask[:, args.experts :].sum()) for r in records) / slots
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_size_arguments(parser)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--new-experts", type=int, default=1)
    parser.add_argument("--stages", type=int, default=4, help="stages of the moextend_stages variant")
    args = parser.parse_args()

    variants = ("base_forward", "base_train_routers", "moextend", "moextend_stages")
    results = {v: in_subprocess(run_variant, v, args) for v in variants}

    baseline = results["base_train_routers"]
    print(
        f"Mixtral hidden={args.hidden} layers={args.layers} experts={args.experts}+{args.new_experts} top-2 "
        f"(moextend_stages: {args.stages} stages of {args.new_experts}), "
        f"batch={args.batch} seq={args.seq}, {args.threads} threads, median of {args.steps} steps"
    )
    print(f"{'variant':<22}{'step (s)':>10}{'x base':>9}{'peak extra MiB':>16}{'x base':>9}{'trainable':>12}")
    for name, r in results.items():
        print(
            f"{name:<22}{r['step_s']:>10.3f}{r['step_s'] / baseline['step_s']:>9.2f}"
            f"{r['peak_extra_mib']:>16.0f}{r['peak_extra_mib'] / max(baseline['peak_extra_mib'], 1):>9.2f}"
            f"{r['trainable']:>12,}"
        )
    for name in ("moextend", "moextend_stages"):
        print(f"{name}: share of routing slots that chose a new expert {results[name]['new_expert_slot_fraction']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
