"""Training and evaluation loops of the benchmark: alignment stage, task stages, accuracy, text probe."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from .data import Task
from .model import Towers, Vocabulary, accepts_modality_ids, collate, example, model_inputs
from .tracks import mixture_plan

# A few dozen factual questions SmolLM2-135M-Instruct is asked before and after the task stages; an answer counts
# when the expected word appears in the first 12 greedily generated tokens.
FACTS = [
    ("What is the capital of France?", "paris"),
    ("What is the capital of Japan?", "tokyo"),
    ("What is the capital of Italy?", "rome"),
    ("What is the capital of Germany?", "berlin"),
    ("What is the capital of Spain?", "madrid"),
    ("What is the capital of England?", "london"),
    ("What is the capital of Russia?", "moscow"),
    ("What is the capital of China?", "beijing"),
    ("What is the capital of Egypt?", "cairo"),
    ("What is the capital of Greece?", "athens"),
    ("What color is the sky on a clear day?", "blue"),
    ("What color is grass?", "green"),
    ("What color is snow?", "white"),
    ("How many days are in a week?", "seven"),
    ("How many legs does a spider have?", "eight"),
    ("How many continents are there?", "seven"),
    ("What is the largest planet in our solar system?", "jupiter"),
    ("Which planet is known as the Red Planet?", "mars"),
    ("What is the chemical symbol for water?", "h2o"),
    ("What gas do plants absorb from the air?", "carbon dioxide"),
    ("What is the freezing point of water in degrees Celsius?", "0"),
    ("Who wrote Romeo and Juliet?", "shakespeare"),
    ("Who painted the Mona Lisa?", "vinci"),
    ("What is the largest ocean on Earth?", "pacific"),
    ("What is the tallest mountain in the world?", "everest"),
    ("What is the longest river in Africa?", "nile"),
    ("Which animal is known as the king of the jungle?", "lion"),
    ("What do bees make?", "honey"),
    ("What is the opposite of hot?", "cold"),
    ("What is the first letter of the English alphabet?", "a"),
    ("Which star is at the center of our solar system?", "sun"),
    ("What is the main language spoken in Brazil?", "portuguese"),
]


def held_out_text() -> str:
    """Held-out English text for perplexity: scikit-learn's dataset descriptions (never trained on here)."""
    from importlib.resources import files

    folder = files("sklearn.datasets") / "descr"
    return "\n\n".join((folder / name).read_text() for name in ("iris.rst", "wine_data.rst", "breast_cancer.rst"))


def batches(rows: list[dict], batch_size: int, pad_id: int, seed: int | None) -> Iterator[dict]:
    """Batches of one modality; shuffled with `seed` (None = in order)."""
    order = np.random.default_rng(seed).permutation(len(rows)) if seed is not None else np.arange(len(rows))
    for start in range(0, len(rows), batch_size):
        yield collate([rows[i] for i in order[start : start + batch_size]], pad_id)


def task_rows(task: Task, split: str, vocabulary: Vocabulary) -> list[dict]:
    return [example(task, x, task.classes[y], vocabulary) for x, y in getattr(task, split)]


BANDS = ("low", "mid", "high", "top")

# Times each caption is seen per alignment epoch, by modality. Video: on `motion` alone (with the former 2-layer video
# encoder), 28 alignment steps left the shift captions' loss at 1.17; 114 steps reached 0.059 (2026-11-30).
ALIGNMENT_REPEATS = {"video": 4}


def alignment_rows(tasks: list[Task], vocabulary: Vocabulary, per_task: int) -> list[dict]:
    """Captions computed from the training inputs alone (never from their labels): a 4x4 ink map of each image
    (mean intensity per 7x7 cell, 0-9), the shift of the ink between a video's consecutive frames (columns, rows, in
    pixels) and a coarse spectrogram of each clip (mean log-mel level, 0-9, of 4 frequency bands x 6 time segments).
    They teach the towers to write LM-readable tokens. The image and audio captions reveal no class; the video
    caption states the motion in numbers, as video-text pretraining captions describe motion, so `motion` asks the
    language model to name it (docs/continual.md, "How `motion` became learnable")."""
    rows = []
    for task in [t for t in tasks if t.modality != "text"]:  # a text task has no tower to align
        for inputs, _ in task.train[:per_task]:
            if task.modality == "image":
                cells = inputs.reshape(4, 7, 4, 7).mean(axis=(1, 3))
                caption = " ".join(str(v) for v in _levels(cells.ravel(), 0.0, max(cells.max(), 1e-6)))
                question = "Describe the ink in a 4x4 grid."
            elif task.modality == "video":
                caption = "; ".join(f"{column:+d} {row:+d}" for column, row in frame_shifts(inputs))
                question = "How far does the ink shift between frames (columns, rows)?"
            else:
                bands = inputs[:, :96].reshape(4, 10, 6, 16).mean(axis=(1, 3))  # (4 mel bands, 6 time segments)
                rows_text = [" ".join(map(str, _levels(band, inputs.min(), inputs.max()))) for band in bands]
                caption = "; ".join(f"{name} {levels}" for name, levels in zip(BANDS, rows_text, strict=True))
                question = "Describe the sound in 4 bands over time."
            template = Task(task.name, task.modality, question, [], "", [], [])
            # one encoded row, repeated (batching only reads rows)
            rows += [example(template, inputs, caption, vocabulary)] * ALIGNMENT_REPEATS.get(task.modality, 1)
    return rows


def frame_shifts(frames: np.ndarray) -> list[tuple[int, int]]:
    """`(t, h, w)` frames -> per pair of consecutive frames the shift (columns, rows) that best maps the first onto
    the second: the peak of their circular cross-correlation (the frames wrap around their edges), in
    [-w/2, w/2). Computed from the pixels alone."""
    size = frames.shape[-1]
    spectra = np.fft.fft2(frames)
    shifts = []
    for first, second in zip(spectra[:-1], spectra[1:], strict=True):
        correlation = np.fft.ifft2(second * np.conj(first)).real
        row, column = np.unravel_index(int(np.argmax(correlation)), correlation.shape)
        shifts.append(((int(column) + size // 2) % size - size // 2, (int(row) + size // 2) % size - size // 2))
    return shifts


def _levels(values: np.ndarray, low: float, high: float) -> list[int]:
    """Values mapped linearly from [low, high] to the digits 0-9."""
    return np.clip((values - low) / max(high - low, 1e-6) * 9.99, 0, 9).astype(int).tolist()


def train(
    model: torch.nn.Module,
    towers: Towers,
    rows: list[dict],
    vocabulary: Vocabulary,
    *,
    epochs: float,
    batch_size: int,
    learning_rate: float,
    seed: int,
    description: str,
    call_kwargs: dict | None = None,
    parameters: list[torch.nn.Parameter] | None = None,
    progress: bool = True,
) -> dict:
    """AdamW with linear warm-up and cosine decay over `epochs` of `rows` (mixed modalities are batched per
    modality), with a progress bar if `progress`. Returns seconds, steps and the mean loss of the last 10 steps."""
    parameters = parameters or [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.0)
    plan = [
        collate([rows[i] for i in indices], vocabulary.pad_id)
        for indices in mixture_plan([row["modality"] for row in rows], epochs, batch_size, seed)
    ]
    warmup = max(1, len(plan) // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, len(plan))))),
    )
    model.train()
    losses = []
    started = time.perf_counter()
    bar = tqdm(plan, desc=description, leave=False, dynamic_ncols=True, disable=not progress)
    for batch in bar:
        loss = model(**model_inputs(model, towers, batch, vocabulary), **(call_kwargs or {})).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-10:]):.3f}")
    model.eval()
    return {"seconds": time.perf_counter() - started, "steps": len(plan), "final_loss": float(np.mean(losses[-10:]))}


@torch.no_grad()
def accuracy(
    model: torch.nn.Module,
    towers: Towers,
    rows: list[dict],
    vocabulary: Vocabulary,
    batch_size: int = 50,
    call_kwargs: dict | None = None,
    on_batch: Callable[[dict], None] | None = None,
) -> float:
    """Greedy exact match: an answer counts when every answer token and the closing `<|im_end|>` is the argmax
    after the correct prefix -- exactly when greedy decoding would produce the answer and stop. Computed in one
    teacher-forced forward per batch."""
    model.eval()
    correct = 0
    for batch in batches(rows, batch_size, vocabulary.pad_id, None):
        inputs = model_inputs(model, towers, batch, vocabulary)
        labels = inputs.pop("labels")
        logits = model(**inputs, **(call_kwargs or {})).logits
        if on_batch is not None:
            on_batch(batch)
        correct += int(exact_match(logits, labels).sum())
    return correct / len(rows)


def exact_match(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """`(b, s, v)` logits, `(b, s)` labels (-100 outside the answer) -> `(b,)` bool: every label token is the
    argmax of the position before it (what greedy decoding from the prompt would produce)."""
    predicted = logits[:, :-1].argmax(dim=-1)
    targets = labels[:, 1:]
    return ((targets == -100) | (predicted == targets)).all(dim=1)


def fact_prompts(vocabulary: Vocabulary) -> dict[str, torch.Tensor]:
    """The factual questions as chat prompts: `input_ids` / `attention_mask` `(32, s)`, padded on the tokenizer's
    current padding side."""
    tokenizer = vocabulary.tokenizer
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
        for q, _ in FACTS
    ]
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    return {"input_ids": encoded.input_ids, "attention_mask": encoded.attention_mask}


def held_out_windows(vocabulary: Vocabulary, length: int = 256) -> torch.Tensor:
    """`held_out_text()` as `(n, length)` token windows."""
    ids = torch.tensor(vocabulary.encode(held_out_text()))
    return ids[: len(ids) // length * length].view(-1, length)


@torch.no_grad()
def text_probe(model: torch.nn.Module, vocabulary: Vocabulary, call_kwargs: dict | None = None) -> dict:
    """Factual-question accuracy (greedy generation) and perplexity of `held_out_text()` (256-token windows)."""
    tokenizer = vocabulary.tokenizer
    model.eval()
    tokenizer.padding_side = "left"
    encoded = fact_prompts(vocabulary)
    text_only = (
        (lambda ids: {"modality_ids": torch.zeros_like(ids)}) if accepts_modality_ids(model) else (lambda ids: {})
    )
    generated = model.generate(
        **encoded,
        **text_only(encoded["input_ids"]),
        max_new_tokens=12,
        do_sample=False,
        pad_token_id=vocabulary.pad_id,
        **(call_kwargs or {}),
    )
    tokenizer.padding_side = "right"
    replies = tokenizer.batch_decode(generated[:, encoded["input_ids"].shape[1] :], skip_special_tokens=True)
    hits = [
        answer in reply.lower().replace(".", " ").split() or (" " in answer and answer in reply.lower())
        for (_, answer), reply in zip(FACTS, replies, strict=True)
    ]
    perplexity = held_out_perplexity(model, vocabulary, call_kwargs)
    return {"fact_accuracy": float(np.mean(hits)), "perplexity": perplexity, "replies": replies}


@torch.no_grad()
def held_out_perplexity(model: torch.nn.Module, vocabulary: Vocabulary, call_kwargs: dict | None = None) -> float:
    """Perplexity of `held_out_text()` in 256-token windows (text only: `modality_ids` all 0 where accepted)."""
    model.eval()
    windows = held_out_windows(vocabulary)
    text_only = (
        (lambda ids: {"modality_ids": torch.zeros_like(ids)}) if accepts_modality_ids(model) else (lambda ids: {})
    )
    total, count = 0.0, 0
    for start in range(0, len(windows), 8):
        chunk = windows[start : start + 8]
        logits = model(input_ids=chunk, **text_only(chunk), **(call_kwargs or {})).logits
        total += float(
            torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum")
        )
        count += chunk[:, 1:].numel()
    return math.exp(total / count)
