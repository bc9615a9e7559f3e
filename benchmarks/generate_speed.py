"""Greedy generation speed with the KV cache: each method vs PEFT LoRA with the same number of trainable parameters
on the same target modules, measured in the same run (and the base model alone).

A randomly initialised Llama (hidden 512, 4 layers; MoExtend: the Mixtral of the same size with 8 experts, top-2)
generates `--new-tokens` tokens after a `--prompt` token prompt whose first 16 tokens are image tokens
(`modality_ids`), at batch 1 and 8. Per-token latency is the decode time per new token,
`(t(new_tokens) - t(1)) / (new_tokens - 1)`, the median of `--repeats` runs; ours, LoRA and the base run interleaved in
one process and the ratio is the median of the per-repeat ratios ours / LoRA. Methods are
configured so that decoded (text) tokens take their adapter path, i.e. the full cost at every step:
- SMoLA: 8 rank-8 experts (4 text, 4 image) on every projection; LoRA r = equal trainable parameters;
- PathWeave: r=8 stages for text and image on every projection;
- CMoE: one task of two rank-8 experts on every projection, no task id at generation (the locator picks it);
- ModeX: text / visual / cross-modal experts after o_proj and down_proj;
- MoExtend: one new expert per MoE layer, text tokens included (no `restrict_to_modalities`); its LoRA baseline
  adapts the attention projections with the same number of trainable parameters as far as the rank allows.

    python benchmarks/generate_speed.py [--new-tokens 128] [--repeats 3] [--json F]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from common import build_llama, build_mixtral, in_subprocess, quiet_libraries

if __name__ in ("__main__", "__mp_main__"):  # this script and its spawned variant processes
    quiet_libraries()

ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
METHODS = ("smola", "pathweave", "cmoe", "modex", "moextend")
IMAGE_TOKENS = 16


def method_config(method: str):
    """(config, target module names of its LoRA baseline)."""
    import peft_moextend

    if method == "smola":
        return peft_moextend.SMoLAConfig(r=8, expert_groups={"text": 4, "image": 4}), ALL_PROJECTIONS
    if method == "pathweave":
        return peft_moextend.PathWeaveConfig(r=8, modalities=["text", "image"]), ALL_PROJECTIONS
    if method == "cmoe":
        return peft_moextend.CMoEConfig(r=8, experts_per_task=2, locator="gaussian"), ALL_PROJECTIONS
    if method == "modex":
        config = peft_moextend.ModeXConfig(experts={"text": ["text"], "visual": ["image"], "cross_modal": None})
        return config, ["o_proj", "down_proj"]
    return peft_moextend.MoExtendConfig(num_new_experts=1, expert_init=0), ATTENTION  # init does not change speed


def build(method: str, args: argparse.Namespace):
    return (build_mixtral if method == "moextend" else build_llama)(args.hidden, args.layers, 512, args.vocab)


def prompt(batch_size: int, args: argparse.Namespace) -> dict:
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, args.vocab, (batch_size, args.prompt), generator=generator)
    modality_ids = torch.zeros_like(input_ids)
    modality_ids[:, :IMAGE_TOKENS] = 1  # image
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "modality_ids": modality_ids}


def adapted(method: str, args: argparse.Namespace):
    """The model with `method`'s adapter as it generates (CMoE: one task with a fitted locator)."""
    from peft import get_peft_model

    model = get_peft_model(build(method, args), method_config(method)[0])
    if method == "cmoe":
        model.base_model.add_task("task")
        model.base_model.fit_locator("task", [prompt(8, args)])
    return model


def variants(method: str, args: argparse.Namespace) -> dict:
    """The three models compared for `method`: ours, LoRA with as many trainable parameters on the same target
    modules, and the base alone."""
    from peft import LoraConfig, get_peft_model

    ours, base = adapted(method, args), build(method, args)
    targets = method_config(method)[1]
    trainable = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    per_rank = sum(m.in_features + m.out_features for n, m in base.named_modules() if n.rsplit(".", 1)[-1] in targets)
    rank = min(max(1, round(trainable / per_rank)), args.hidden)
    lora = get_peft_model(build(method, args), LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets))
    return {"ours": ours, "lora": lora, "base": base}


def run_method(method: str, args: argparse.Namespace) -> dict:
    """Per-token decode latency of ours / LoRA / base at each batch size, in one process with the variants
    interleaved (so that drift in the machine's speed hits all three alike); the ratio is the median of the
    per-repeat ratios."""
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    models = {name: model.to(device=device, dtype=dtype).eval() for name, model in variants(method, args).items()}
    result = {
        name: {"trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}
        for name, model in models.items()
    }

    def decode_seconds(name: str, inputs: dict) -> float:
        if name != "ours":
            inputs = {k: v for k, v in inputs.items() if k != "modality_ids"}
        times = []
        for new_tokens in (args.new_tokens, 1):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            started = time.perf_counter()
            with torch.no_grad():
                models[name].generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - started)
        return (times[0] - times[1]) / (args.new_tokens - 1)

    for batch_size in args.batch_sizes:
        inputs = {k: v.to(device) for k, v in prompt(batch_size, args).items()}
        for name in models:  # warm-up
            decode_seconds(name, inputs)
        runs = [{name: decode_seconds(name, inputs) for name in models} for _ in range(args.repeats)]
        for name in models:
            result[name].setdefault("per_token_s", {})[batch_size] = statistics.median(r[name] for r in runs)
        result["ours"].setdefault("ratio_to_lora", {})[batch_size] = statistics.median(
            r["ours"] / r["lora"] for r in runs
        )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="e.g. cuda (models are built on the CPU, then moved)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    print(
        f"hidden={args.hidden} layers={args.layers}, prompt {args.prompt} tokens ({IMAGE_TOKENS} image), "
        f"{args.new_tokens} new tokens, greedy with KV cache, {args.device} {args.dtype}, {args.threads} threads, "
        f"median of {args.repeats}\n"
    )
    header = "| method | trainable (ours / LoRA) | " + " | ".join(
        f"batch {b}: ms/token ours / LoRA / base | ratio to LoRA" for b in args.batch_sizes
    )
    print(header + " |\n" + "|---" * (2 + 2 * len(args.batch_sizes)) + "|")
    results = {}
    for method in args.methods:
        runs = in_subprocess(run_method, method, args)
        results[method] = runs
        if "error" in runs:
            print(f"| {method} | failed: {runs['error']} |", flush=True)
            continue
        cells = []
        for b in args.batch_sizes:
            ours, lora, base = (runs[v]["per_token_s"][b] * 1000 for v in ("ours", "lora", "base"))
            cells.append(f"{ours:.2f} / {lora:.2f} / {base:.2f} | **{runs['ours']['ratio_to_lora'][b]:.2f}x**")
        trainable = f"{runs['ours']['trainable']:,} / {runs['lora']['trainable']:,}"
        print(f"| {method} | {trainable} | " + " | ".join(cells) + " |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
