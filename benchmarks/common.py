"""Shared measurement code of the overhead benchmarks: one process per variant, median step time, peak RSS."""

from __future__ import annotations

import argparse
import importlib
import logging
import multiprocessing as mp
import os
import queue as queue_module
import resource
import statistics
import threading
import time
import warnings
from collections.abc import Callable

import torch


def quiet_libraries() -> None:
    """Keep a benchmark's output to what its reader can act on: no progress bars or info logs of transformers'
    loaders, no FutureWarnings (transformers 5 deprecations that peft and transformers trigger internally: a
    user cannot act on them), not bitsandbytes' note (on CPUs with AVX512-BF16) that its optional `kernels`
    package is missing, and not DeepSpeed's note that it found no GPU (deepspeed, in the test extra, is imported by
    transformers; its logger resets its level when created, so a filter drops the note). This package's own warnings
    stay (it issues no FutureWarning)."""
    import transformers

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    logging.getLogger("DeepSpeed").addFilter(lambda record: record.levelno >= logging.ERROR)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)


def in_subprocess(target: Callable[..., dict], *args, quiet: bool = False) -> dict:
    """Run `target(*args)` in a fresh spawned process (so peak RSS is its own) and return its result dict; a
    process that dies without a result gives `{"error": ..., "traceback": ""}` instead of a hang. With `quiet`, the
    process calls `quiet_libraries()` before it imports `target`'s module (which may load bitsandbytes)."""
    context = mp.get_context("spawn")
    results = context.Queue()
    if quiet:
        if target.__module__ == "__main__":
            raise ValueError("`quiet` needs a target importable by module name, not one defined in __main__")
        target = (target.__module__, target.__qualname__)
    process = context.Process(target=_call, args=(results, target, args, os.getpid()), daemon=True)
    process.start()
    while True:
        try:
            result = results.get(timeout=5)
            break
        except queue_module.Empty:
            if not process.is_alive():
                result = {"error": f"the process died (exit code {process.exitcode})", "traceback": ""}
                break
    process.join()
    return result


def _call(queue: mp.Queue, target: Callable[..., dict] | tuple[str, str], args: tuple, parent: int) -> None:
    threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()
    if isinstance(target, tuple):  # (module, name) of a quiet process: import it only now
        quiet_libraries()
        target = getattr(importlib.import_module(target[0]), target[1])
    queue.put(target(*args))


def _exit_with_parent(parent: int, interval: float = 1.0) -> None:
    """End this process once `parent` is gone (killed without the chance to stop its children, e.g. by SIGTERM), so
    that a stopped benchmark leaves no orphan computing on."""
    while os.getppid() == parent:
        time.sleep(interval)
    os._exit(1)


def measure_steps(model: torch.nn.Module, batch: dict, steps: int, train: bool = True) -> dict:
    """Median seconds per training step (AdamW on the trainable parameters) or per no-grad forward, and the peak
    RSS growth in MiB over the steps. Step 0 warms up allocators and kernels and is not timed."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4) if train else None
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for step in range(steps + 1):
        start = time.perf_counter()
        if optimizer is None:
            with torch.no_grad():
                model(**batch)
        else:
            optimizer.zero_grad(set_to_none=True)
            model(**batch).loss.backward()
            optimizer.step()
        if step > 0:
            times.append(time.perf_counter() - start)
    return {
        "step_s": statistics.median(times),
        "peak_extra_mib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024,
        "trainable": sum(p.numel() for p in params) if train else 0,
    }


def _decoder_dimensions(hidden: int, layers: int, vocab: int, max_positions: int) -> dict:
    return {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "max_position_embeddings": max_positions,
    }


def build_llama(hidden: int, layers: int, seq: int, vocab: int):
    """A randomly initialised Llama of the given size (seeded), sdpa attention, float32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**_decoder_dimensions(hidden, layers, vocab, seq))
    return LlamaForCausalLM._from_config(config, attn_implementation="sdpa", dtype=torch.float32)


def build_mixtral(hidden: int, layers: int, seq: int, vocab: int):
    """The Mixtral counterpart of `build_llama`: the same dimensions, 8 experts of width 2 * hidden, top-2."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(
        **_decoder_dimensions(hidden, layers, vocab, seq), num_local_experts=8, num_experts_per_tok=2
    )
    return MixtralForCausalLM._from_config(config, attn_implementation="sdpa", dtype=torch.float32)


def add_size_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every overhead benchmark shares: model and batch size, steps, threads, a JSON output path."""
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write the results to this file")


def current_rss_bytes() -> int:
    """The process's resident set size now (Linux /proc; ru_maxrss where /proc is missing)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def release_freed_memory() -> None:
    """Give memory freed by Python/torch back to the OS (glibc `malloc_trim`), so that RSS measures live data and
    not what the allocator kept from earlier peaks (e.g. loading a float32 checkpoint before quantizing it)."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    libc_name = ctypes.util.find_library("c")
    if libc_name:
        try:
            ctypes.CDLL(libc_name).malloc_trim(0)
        except (OSError, AttributeError):  # not glibc
            pass


class PeakRSS:
    """Context manager sampling the process's RSS every `interval` s in a thread: `.peak` is the highest RSS seen
    inside the block (unlike ru_maxrss, not hidden by a higher peak earlier, e.g. while loading a model)."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, current_rss_bytes())
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        self.peak = current_rss_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, current_rss_bytes())
