"""7: 2-process CPU runs (gloo) train like one process with the same global batch: DDP through `accelerate launch`,
and FSDP2 (`fully_shard` directly, and accelerate's FSDP2 plugin), where the frozen base is sharded, rank 0 saves the
adapter alone and it reloads exactly in one process. (DeepSpeed: see docs/distributed.md.)"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from helpers import run_command
from peft import PeftModel
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file

from conformance.cases import CASES, case_id, make_model
from conformance.sharded_train import train

SCRIPT = Path(__file__).with_name("ddp_train.py")
SHARDED_SCRIPT = Path(__file__).with_name("sharded_train.py")  # importable: its launch-time code is under __main__


def _run(command: list[str], tmp_path: Path) -> None:
    # CPU only, also on a GPU machine (where rank 1 would otherwise ask for a second GPU)
    run_command(command, cwd=tmp_path, ACCELERATE_USE_CPU="true", CUDA_VISIBLE_DEVICES="")


def _accelerate_launch(script: Path, *args: str) -> list[str]:
    accelerate = Path(sys.executable).with_name("accelerate")
    return [
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
        str(script),
        *args,
    ]


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_7_two_process_ddp_matches_single_process(case, tmp_path):
    _run([sys.executable, str(SCRIPT), case.name, str(tmp_path / "single.safetensors")], tmp_path)
    _run(_accelerate_launch(SCRIPT, case.name, str(tmp_path / "ddp.safetensors")), tmp_path)
    single, ddp = load_file(tmp_path / "single.safetensors"), load_file(tmp_path / "ddp.safetensors")
    assert single.keys() == ddp.keys() and all(case.prefix in k for k in single)
    initial_moved = False
    for name, value in single.items():
        # the load-balancing loss is computed per process (as Switch/Mixtral do per device), so methods with a
        # router aux loss differ from the single process by that term's batch dependence (~1e-5 here)
        torch.testing.assert_close(ddp[name], value, rtol=1e-3, atol=1e-4)
        initial_moved |= bool(value.abs().sum() > 0)
    assert initial_moved


def _check_sharded_runs(case, tmp_path: Path, modes: tuple[str, ...], sharded: tuple[str, ...]) -> None:
    """Each mode's run against the single-process reference in tmp_path/single (see sharded_train.py)."""
    single = load_file(tmp_path / "single" / "adapter" / "adapter_model.safetensors")
    assert single and all(case.prefix in k for k in single)
    for mode in modes:
        out = tmp_path / mode
        # the loss curve of the sharded run is the single process's (router aux losses are per process, ~1e-3)
        losses, reference = (json.loads((d / "losses.json").read_text()) for d in (out, tmp_path / "single"))
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(reference), rtol=2e-3, atol=0)
        # in parameter-sharding modes every frozen base parameter with more than one element is split in two
        if mode in sharded:
            sharding = json.loads((out / "sharding.json").read_text())
            assert sharding and all(local <= -(-full // 2) for local, full in sharding.values() if full > 1), sharding
        # rank 0 saved the whole adapter and nothing else, with the single process's weights up to the aux loss
        saved = load_file(out / "adapter" / "adapter_model.safetensors")
        assert saved.keys() == single.keys(), mode
        for name, value in single.items():
            where = f"{mode} {name}"
            torch.testing.assert_close(saved[name], value, rtol=1e-3, atol=1e-4, msg=lambda m, at=where: f"{at}: {m}")
        # one process reloads it onto a fresh base: the same tensors and the sharded model's logits
        reloaded = PeftModel.from_pretrained(make_model(case.text_family), out / "adapter").eval()
        state = get_peft_model_state_dict(reloaded)
        assert state.keys() == saved.keys() and all(torch.equal(state[k], saved[k]) for k in saved)
        expected = torch.load(out / "logits.pt")
        evaluation = {k: v for k, v in expected["evaluation"].items() if k != "labels"}
        with torch.no_grad():
            torch.testing.assert_close(reloaded(**evaluation).logits, expected["logits"])


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_7_fsdp2_two_processes_match_single_process_and_reload_exactly(case, tmp_path):
    _run(_accelerate_launch(SHARDED_SCRIPT, "fsdp", case.name, str(tmp_path)), tmp_path)
    train(case.name, tmp_path / "single", "single")
    _check_sharded_runs(case, tmp_path, ("fully_shard", "accelerate"), sharded=("fully_shard", "accelerate"))


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_7_deepspeed_zero2_and_zero3_match_single_process_and_reload_exactly(case, tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    port = ["--master-port", str(30500 + os.getpid() % 1000)]
    _run([*torchrun, *port, str(SHARDED_SCRIPT), "deepspeed", case.name, str(tmp_path)], tmp_path)
    train(case.name, tmp_path / "single", "single")
    _check_sharded_runs(case, tmp_path, ("zero2", "zero3"), sharded=("zero3",))
