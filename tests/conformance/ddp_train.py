"""Train one method for a few steps with `accelerate` and save the adapter weights (used by test_distributed.py).

    accelerate launch --multi_gpu --num_processes 2 tests/conformance/ddp_train.py METHOD OUT   # 2 CPU processes (gloo)
    python tests/conformance/ddp_train.py METHOD OUT                                          # 1 process

The global batch is 4 in both cases (2 per process with 2 processes).
"""

from __future__ import annotations

import faulthandler
import os
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/

from peft import get_peft_model  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from conformance.cases import CASES, make_batch, make_model, perturb_adapter  # noqa: E402

GLOBAL_BATCH, STEPS = 4, 3


def main(method: str, out: str) -> None:
    case = next(c for c in CASES if c.name == method)
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = get_peft_model(make_model(case.text_family), case.make_config(case.text_family, 0))
    perturb_adapter(model, case.prefix)  # breaks the exact top-k ties of copy-initialised experts
    rows = [
        make_batch(model.get_base_model(), case.text_family, batch_size=1, seed=i) for i in range(GLOBAL_BATCH * STEPS)
    ]
    per_process = GLOBAL_BATCH // accelerator.num_processes
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    for step in range(STEPS):
        start = step * GLOBAL_BATCH + accelerator.process_index * per_process
        batch = {k: torch.cat([r[k] for r in rows[start : start + per_process]]) for k in rows[0]}
        optimizer.zero_grad()
        accelerator.backward(model(**batch).loss)
        optimizer.step()
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        save_file({n: p.detach().contiguous() for n, p in unwrapped.named_parameters() if p.requires_grad}, out)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    faulthandler.dump_traceback_later(240, exit=True)  # a hang prints every thread's stack instead of stalling CI
    main(sys.argv[1], sys.argv[2])
    # Skip interpreter teardown: with two such jobs on a loaded 2-core machine, gloo's teardown occasionally aborted
    # ("terminate called without an active exception") without destroy_process_group, and a run with it hung once
    # in ten. The result file is written and the barrier passed; a hard exit avoids the teardown.
    sys.stdout.flush()
    os._exit(0)
