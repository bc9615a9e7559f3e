"""The continual benchmark's synthetic, data-free mode: CMoE vs sequential LoRA (forgets) vs one LoRA per task with
an oracle task id (upper bound) on three synthetic tasks, in seconds, with no weights or data to install.

Each task maps its own input tokens to answer tokens through its own random lookup table; sequences alternate
`x1 y1 x2 y2 ...` and only the answers are trained and scored (next-token accuracy). Inputs of the three tasks come
from disjoint token ranges and all tasks answer in the same shared range, so one shared adapter has to overwrite
what earlier tasks wrote. The base model is a frozen tiny Llama (hidden 64, 2 layers) built from a config.

It measures what the real-data run (`python -m benchmarks.continual --methods sequential_lora oracle_lora cmoe`)
measures -- accuracy matrix, average accuracy and backward transfer (`report.summary`), trainable parameters per
task, CMoE's locator accuracy and PGKE's extended layers -- on tasks CPU CI can learn in seconds.

    python -m benchmarks.continual.synthetic [--steps 150] [--json results.json]
"""

from __future__ import annotations

import argparse
import json

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import peft_moextend

from .report import summary

ANSWERS = range(3, 35)  # shared answer tokens
TASK_INPUTS = {"A": range(35, 66), "B": range(66, 97), "C": range(97, 128)}
PAIRS = 8
METHODS = ("sequential_lora", "oracle_lora", "cmoe")  # the names of `benchmarks.continual.methods.METHODS`


def make_tasks(seed: int = 0) -> dict[str, dict[int, int]]:
    generator = torch.Generator().manual_seed(seed)
    answers = torch.tensor(list(ANSWERS))
    return {
        name: {x: int(answers[torch.randint(len(answers), (1,), generator=generator)]) for x in inputs}
        for name, inputs in TASK_INPUTS.items()
    }


def make_batch(table: dict[int, int], size: int, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    keys = torch.tensor(list(table))
    x = keys[torch.randint(len(keys), (size, PAIRS), generator=generator)]
    y = torch.tensor([[table[int(v)] for v in row] for row in x])
    input_ids = torch.stack([x, y], dim=-1).reshape(size, 2 * PAIRS)
    labels = torch.full_like(input_ids, -100)
    labels[:, 1::2] = y
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


def base_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM._from_config(config, attn_implementation="sdpa", dtype=torch.float32)


def train(model, table, steps: int, seed: int) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=5e-3)
    model.train()
    for step in range(steps):
        optimizer.zero_grad()
        model(**make_batch(table, 16, seed * 100_000 + step)).loss.backward()
        optimizer.step()
    model.eval()


@torch.no_grad()
def accuracy(model, table, **kwargs) -> float:
    batch = make_batch(table, 128, seed=999)
    labels = batch.pop("labels")
    predictions = model(**batch, **kwargs).logits.argmax(-1)[:, :-1]
    targets = labels[:, 1:]
    answered = targets != -100
    return float((predictions[answered] == targets[answered]).float().mean())


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def run(method: str, tasks: dict, steps: int) -> dict:
    names = list(tasks)
    matrix, per_task_params, locator_accuracy, extended = [], [], None, []
    lora = LoraConfig(
        r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    if method == "sequential_lora":
        model = get_peft_model(base_model(), lora)
    elif method == "oracle_lora":
        model = get_peft_model(base_model(), lora, adapter_name=names[0])
    else:
        config = peft_moextend.CMoEConfig(r=8, experts_per_task=2, lora_alpha=16, locator="vae", probe_steps=20)
        model = get_peft_model(base_model(), config)
    for stage, name in enumerate(names):
        table = tasks[name]
        if method == "oracle_lora":
            if stage:
                model.add_adapter(name, lora)
            model.set_adapter(name)
        elif method == "cmoe":
            probes = [make_batch(table, 16, seed=50_000 + i) for i in range(20)] if stage else None
            info = model.base_model.add_task(name, probe_data=probes)
            extended.append(f"{len(info['extended_layers'])}/{len(model.base_model._layers())}")
        per_task_params.append(trainable(model))
        train(model, table, steps, seed=stage)
        if method == "cmoe":
            model.base_model.fit_locator(name, [make_batch(table, 32, seed=70_000 + i) for i in range(4)])
        row = []
        for other in names[: stage + 1]:
            if method == "oracle_lora":
                model.set_adapter(other)
            row.append(accuracy(model, tasks[other]))  # CMoE: no task given, the locator routes every sample
        if method == "oracle_lora":
            model.set_adapter(name)
        matrix.append(row)
    if method == "cmoe":
        held_out = {n: model.base_model.locate([make_batch(t, 64, seed=123)]) for n, t in tasks.items()}
        locator_accuracy = sum(p == n for n, preds in held_out.items() for p in preds) / sum(
            map(len, held_out.values())
        )
    return {
        "matrix": matrix,
        **summary(matrix),
        "trainable_per_task": per_task_params,
        "locator_accuracy": locator_accuracy,
        "extended_layers_per_task": extended,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    torch.set_num_threads(2)
    tasks = make_tasks()
    results = {m: run(m, tasks, args.steps) for m in METHODS}
    names = list(tasks)
    for method, r in results.items():
        print(f"\n{method}: accuracy of task (column) after training stage (row)")
        print("stage " + "".join(f"{n:>8}" for n in names))
        for name, row in zip(names, r["matrix"]):
            print(f"{name:<6}" + "".join(f"{v:>8.3f}" for v in row))
    print(f"\n{'method':<17}{'avg acc':>9}{'BWT':>9}{'locator':>9}  trainable params per task")
    for method, r in results.items():
        locator = f"{r['locator_accuracy']:.3f}" if r["locator_accuracy"] is not None else "-"
        print(
            f"{method:<17}{r['average_accuracy']:>9.3f}{r['backward_transfer']:>9.3f}{locator:>9}  "
            f"{r['trainable_per_task']}"
        )
    print(f"CMoE layers extended per task (PGKE): {results['cmoe']['extended_layers_per_task']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
