"""7: a 2-process CPU run with `accelerate launch` (DDP over gloo) trains like one process with the same global
batch. (DeepSpeed ZeRO and FSDP need GPUs; see docs/distributed.md.)"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from helpers import run_command
from safetensors.torch import load_file

from conformance.cases import CASES, case_id

SCRIPT = Path(__file__).with_name("ddp_train.py")


def _run(command: list[str], tmp_path: Path) -> None:
    # CPU only, also on a GPU machine (where rank 1 would otherwise ask for a second GPU)
    run_command(command, cwd=tmp_path, ACCELERATE_USE_CPU="true", CUDA_VISIBLE_DEVICES="")


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_7_two_process_ddp_matches_single_process(case, tmp_path):
    accelerate = Path(sys.executable).with_name("accelerate")
    _run([sys.executable, str(SCRIPT), case.name, str(tmp_path / "single.safetensors")], tmp_path)
    _run(
        [
            str(accelerate),
            "launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            str(29500 + os.getpid() % 1000),
            str(SCRIPT),
            case.name,
            str(tmp_path / "ddp.safetensors"),
        ],
        tmp_path,
    )
    single, ddp = load_file(tmp_path / "single.safetensors"), load_file(tmp_path / "ddp.safetensors")
    assert single.keys() == ddp.keys() and all(case.prefix in k for k in single)
    initial_moved = False
    for name, value in single.items():
        # the load-balancing loss is computed per process (as Switch/Mixtral do per device), so methods with a
        # router aux loss differ from the single process by that term's batch dependence (~1e-5 here)
        torch.testing.assert_close(ddp[name], value, rtol=1e-3, atol=1e-4)
        initial_moved |= bool(value.abs().sum() > 0)
    assert initial_moved
