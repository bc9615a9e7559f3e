"""Train one method for a few steps with sharded data parallelism and save what test_distributed.py compares.

    accelerate launch --multi_gpu --num_processes 2 tests/conformance/sharded_train.py fsdp METHOD OUT
    torchrun --nproc-per-node 2 tests/conformance/sharded_train.py deepspeed METHOD OUT

`fsdp` runs FSDP2 `fully_shard` directly (OUT/fully_shard) and then accelerate's FSDP2 plugin (OUT/accelerate) in the
same two processes; `deepspeed` runs ZeRO-2 (OUT/zero2) and then ZeRO-3 (OUT/zero3). The test runs
`train(METHOD, OUT/single, "single")` in its own process as the reference. The global batch is 4 in every mode (2
per process with 2 processes). Each OUT/mode receives `adapter/` (save_pretrained from rank 0 with a full state
dict: the adapter alone is saved), `losses.json` (global loss per step), `logits.pt` (the trained model on an
evaluation batch) and `sharding.json` (per frozen base parameter: local and full element counts; ZeRO-2 shards
optimizer state and gradients only, so its parameters stay whole).

accelerate enables FSDP only for accelerator device types (accelerate/state.py leaves a CPU run as MULTI_CPU, DDP);
the `accelerate` mode therefore switches the state to FSDP after `Accelerator(cpu=True, fsdp_plugin=...)`, so that
`prepare`, `get_state_dict` and the optimizer hand-over run accelerate's own FSDP2 code paths on CPU.
"""

from __future__ import annotations

import faulthandler
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/

from peft import get_peft_model  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

from conformance.cases import CASES, make_batch, make_model, perturb_adapter  # noqa: E402

GLOBAL_BATCH, STEPS = 4, 3


def decoder_layer_classes(model: torch.nn.Module) -> set[type]:
    """The classes transformers keeps whole on one device (`_no_split_modules`): the FSDP units, one per layer."""
    names = set(model.get_base_model()._no_split_modules or ())
    return {type(m) for m in model.modules() if type(m).__name__ in names}


def adapter_state_dict(model: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """Full (gathered) tensors of the adapter's entries only; a collective: every rank calls it. Gathering only
    the adapter keeps rank 0's memory at the adapter's size instead of the whole model's."""
    gathered = {}
    for name, value in model.state_dict().items():
        if prefix in name:
            gathered[name] = (value.full_tensor() if isinstance(value, DTensor) else value).detach().cpu()
    return gathered


def zero3_adapter_state_dict(model: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """The adapter's entries of a ZeRO-3 model, gathered from their partitions; a collective."""
    import deepspeed

    named = {n: p for n, p in model.named_parameters() if prefix in n}
    with deepspeed.zero.GatheredParameters(list(named.values())):
        gathered = {n: p.detach().cpu().clone() for n, p in named.items()}
    buffers = {n: b.detach().cpu() for n, b in model.named_buffers() if prefix in n}
    return gathered | buffers


def sharding_report(model: torch.nn.Module, prefix: str) -> dict[str, list[int]]:
    """Per frozen base parameter: [local elements, full elements]."""
    report = {}
    for name, p in model.named_parameters():
        if prefix not in name:
            if hasattr(p, "ds_tensor"):  # ZeRO-3 partition
                report[name] = [p.ds_tensor.numel(), p.ds_numel]
            else:
                local = p.to_local() if isinstance(p, DTensor) else p
                report[name] = [local.numel(), p.numel()]
    return report


def accelerate_fsdp2(accelerator_cls, plugin_cls):
    """An `Accelerator` with accelerate's FSDP2 plugin on CPU processes (see the module docstring)."""
    from accelerate import PartialState
    from accelerate.utils import DistributedType

    plugin = plugin_cls(fsdp_version=2, state_dict_type="FULL_STATE_DICT")
    accelerator = accelerator_cls(cpu=True, fsdp_plugin=plugin)
    # AcceleratorState copies PartialState's fields at every construction: set both
    accelerator.state.distributed_type = PartialState().distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin
    return accelerator


def train(method: str, out: Path, mode: str, accelerator=None) -> None:
    """Train `method` in `mode` ("single", "fully_shard", "accelerate", "zero2" or "zero3") and write OUT's files
    (rank 0)."""
    case = next(c for c in CASES if c.name == method)
    world, rank = (dist.get_world_size(), dist.get_rank()) if mode != "single" else (1, 0)
    torch.manual_seed(0)
    model = get_peft_model(make_model(case.text_family), case.make_config(case.text_family, 0))
    perturb_adapter(model, case.prefix)  # breaks the exact top-k ties of copy-initialised experts
    rows = [
        make_batch(model.get_base_model(), case.text_family, batch_size=1, seed=i) for i in range(GLOBAL_BATCH * STEPS)
    ]
    evaluation = make_batch(model.get_base_model(), case.text_family, batch_size=2, seed=1000)
    layer_classes = decoder_layer_classes(model)
    if mode == "fully_shard":
        for module in model.modules():
            if type(module) in layer_classes:
                fully_shard(module)
        fully_shard(model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    if mode == "accelerate":
        plugin = accelerator.state.fsdp_plugin
        plugin.transformer_cls_names_to_wrap = sorted(cls.__name__ for cls in layer_classes)
        plugin.auto_wrap_policy = "transformer_based_wrap"
        plugin.set_auto_wrap_policy(model)
        model, optimizer = accelerator.prepare(model, optimizer)
    if mode in ("zero2", "zero3"):
        import deepspeed

        config = {
            "train_micro_batch_size_per_gpu": GLOBAL_BATCH // world,
            "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": int(mode[-1])},
            "zero_allow_untested_optimizer": True,  # plain SGD, as in the other modes
            # DeepSpeed clips the gradient norm to 1.0 unless told otherwise (GRADIENT_CLIPPING_DEFAULT); the other
            # modes do not clip (CMoE's third step here has norm ~1.16 and was scaled by 0.86)
            "gradient_clipping": 0.0,
        }
        engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)

    model.train()
    per_process, losses = GLOBAL_BATCH // world, []
    for step in range(STEPS):
        start = step * GLOBAL_BATCH + rank * per_process
        batch = {k: torch.cat([r[k] for r in rows[start : start + per_process]]) for k in rows[0]}
        optimizer.zero_grad()
        if mode in ("zero2", "zero3"):
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()
        else:
            loss = model(**batch).loss
            (accelerator.backward(loss) if mode == "accelerate" else loss.backward())
            optimizer.step()
        global_loss = loss.detach().clone()
        if world > 1:
            dist.all_reduce(global_loss)
        losses.append(global_loss.item() / world)

    model.eval()
    with torch.no_grad():
        inputs = {k: v for k, v in evaluation.items() if k != "labels"}
        logits = (engine if mode in ("zero2", "zero3") else model)(**inputs).logits
    # accelerate's documented path gathers the full model state dict on rank 0; directly, gather the adapter only
    if mode == "accelerate":
        state = accelerator.get_state_dict(model)
    elif mode == "zero3":
        state = zero3_adapter_state_dict(model, case.prefix)
    else:
        state = adapter_state_dict(model, case.prefix)
    sharding = sharding_report(model, case.prefix)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        unwrapped = accelerator.unwrap_model(model) if mode == "accelerate" else model
        unwrapped.save_pretrained(out / "adapter", state_dict=state)
        torch.save({"logits": logits, "evaluation": evaluation}, out / "logits.pt")
        (out / "losses.json").write_text(json.dumps(losses))
        (out / "sharding.json").write_text(json.dumps(sharding))
    if world > 1:
        dist.barrier()


def main(kind: str, method: str, out: Path) -> None:
    """`fsdp` under `accelerate launch` with 2 processes: FSDP2 directly (OUT/fully_shard), then through
    accelerate's plugin (OUT/accelerate), in the process group the `Accelerator` set up. `deepspeed` under torchrun:
    ZeRO-2 (OUT/zero2), then ZeRO-3 (OUT/zero3)."""
    if kind == "fsdp":
        from accelerate import Accelerator, FullyShardedDataParallelPlugin

        accelerator = accelerate_fsdp2(Accelerator, FullyShardedDataParallelPlugin)
        train(method, out / "fully_shard", "fully_shard")
        train(method, out / "accelerate", "accelerate", accelerator)
    elif kind == "deepspeed":
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
        train(method, out / "zero2", "zero2")
        train(method, out / "zero3", "zero3")
    else:
        raise ValueError(f"unknown kind {kind!r}: use 'fsdp' or 'deepspeed'")


if __name__ == "__main__":
    faulthandler.dump_traceback_later(240, exit=True)  # a hang prints every thread's stack instead of stalling CI
    main(sys.argv[1], sys.argv[2], Path(sys.argv[3]))
    # as ddp_train.py: skip interpreter teardown, where gloo occasionally aborted or hung on a loaded 2-core machine
    sys.stdout.flush()
    os._exit(0)
