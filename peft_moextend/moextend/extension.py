"""MoExtend's extension stage (paper Sec. 3.2): where to add experts and which expert to copy.

The paper briefly tunes only the original routers on new-domain data, measures each MoE layer's expert-usage
distribution before and after, and extends the layers whose usage changed most (standard deviation of the change
across experts; half of the layers in the paper). Each new expert is initialised from the layer's most used expert
after tuning. (The public code takes `argsort(...)[..., :2]`, i.e. the *least* used experts; we use top-k.) Usage
is counted on the tokens the new experts will serve (`restrict_to_modalities`). The public code fine-tunes from the
router-tuned model; `tune_routers_and_plan` restores the routers unless `keep_tuned_routers=True`.
"""

from __future__ import annotations

import copy
import inspect
import itertools
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from transformers.utils.logging import tqdm

from ..modality import (
    MODALITIES,
    modality_ids_from_input_ids,
    modality_index,
    modality_token_ids,
    validate_modalities,
)
from ..moe_families import MoEFamily, moe_blocks
from ..routing import expert_usage

logger = logging.getLogger("peft_moextend")


def supported_moe_blocks(model: nn.Module) -> dict[int, tuple[nn.Module, MoEFamily]]:
    """`{decoder_layer_index: (block, family)}` for the supported MoE blocks of `model`."""
    blocks = {b.layer_index: (b.block, b.family) for b in moe_blocks(model) if b.family is not None}
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no supported MoE layer to measure expert usage on.")
    return blocks


def counted_tokens(
    model: nn.Module, batch: dict[str, torch.Tensor], restrict_to_modalities: Iterable[str] | None
) -> torch.Tensor | None:
    """`(b*s,)` bool: the tokens of `batch` whose routing counts — not padding (`attention_mask == 0`) and, with
    `restrict_to_modalities`, of those modalities (from `batch["modality_ids"]`, else the model's placeholder tokens
    in `input_ids`). None: every token counts."""
    mask = batch.get("attention_mask")
    counted = mask.reshape(-1).bool() if mask is not None else None
    if restrict_to_modalities is None:
        return counted
    allowed = validate_modalities(restrict_to_modalities, "restrict_to_modalities")
    modality_ids = batch.get("modality_ids")
    if modality_ids is None:
        token_ids = modality_token_ids(getattr(model, "config", None))
        unmarkable = sorted(set(allowed) - {"text"} - set(token_ids))
        if batch.get("input_ids") is None or unmarkable:
            missing = f"placeholder token ids for {unmarkable}" if unmarkable else "`input_ids`"
            raise ValueError(
                f"Counting only {list(allowed)} tokens (`restrict_to_modalities`) needs the modality of every token, "
                f"but these batches have no `modality_ids` and the model gives no {missing}. Add a `modality_ids` "
                f"entry (ints of shape (batch, seq) indexing {list(MODALITIES)}) to every batch."
            )
        modality_ids = modality_ids_from_input_ids(batch["input_ids"], token_ids)
    indices = torch.tensor([modality_index(m) for m in allowed], device=modality_ids.device)
    eligible = torch.isin(modality_ids.reshape(-1), indices)
    return eligible if counted is None else eligible & counted.to(eligible.device)


@torch.no_grad()
def measure_expert_usage(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    max_batches: int | None = None,
    restrict_to_modalities: Iterable[str] | None = None,
) -> dict[int, torch.Tensor]:
    """Fraction of routing slots each expert receives, per MoE layer: `{layer_index: (num_experts,)}`.

    `batches` yields keyword dicts for `model(**batch)` (e.g. a DataLoader over tokenized data); labels are ignored.
    Padding tokens (attention_mask == 0) are not counted. `restrict_to_modalities` (e.g. `["image"]`, as in
    `MoExtendConfig`): count only the tokens of those modalities, the ones the new experts will serve — marked by a
    `modality_ids` entry in the batch (ints `(batch, seq)` indexing `peft_moextend.modality.MODALITIES`), else by the
    model's placeholder tokens in `input_ids`. A layer that saw no counted token gets all zeros.
    """
    blocks = supported_moe_blocks(model)
    counts = {index: torch.zeros(family.num_experts(block)) for index, (block, family) in blocks.items()}
    current_mask: list[torch.Tensor | None] = [None]
    restricted = restrict_to_modalities is not None
    # models adapted by this package take `modality_ids`; a plain transformers model does not
    transformers_model = model.get_base_model() if hasattr(model, "get_base_model") else model
    takes_modality_ids = "modality_ids" in inspect.signature(transformers_model.forward).parameters

    def make_hook(index: int, block: nn.Module, family: MoEFamily):
        def hook(module: nn.Module, args: tuple, output) -> None:
            top_k_index = family.top_k_index(family.router_logits(output), family.top_k(block))  # (t, k)
            mask = current_mask[0]
            if mask is not None and mask.numel() != top_k_index.shape[0]:
                if restricted:
                    raise ValueError(
                        f"MoE layer {index} routes {top_k_index.shape[0]} tokens but the batch marks {mask.numel()} "
                        "(`input_ids` / `modality_ids`), so the tokens of `restrict_to_modalities` cannot be told "
                        "apart: give `modality_ids` of the shape of the tokens the language model sees."
                    )
                mask = None
            counts[index] += expert_usage(top_k_index, counts[index].numel(), mask).cpu()

        return hook

    handles = [
        family.router(block).register_forward_hook(make_hook(i, block, family)) for i, (block, family) in blocks.items()
    ]
    was_training = model.training
    model.eval()
    try:
        for batch in tqdm(itertools.islice(batches, max_batches), desc="measuring expert usage", leave=False):
            current_mask[0] = counted_tokens(model, batch, restrict_to_modalities)
            dropped = ("labels",) if takes_modality_ids else ("labels", "modality_ids")
            model(**{k: v for k, v in batch.items() if k not in dropped})
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return {index: c / c.sum().clamp_min(1) for index, c in counts.items()}


@dataclass
class ExtensionPlan:
    """Which MoE layers to extend and from which expert.

    layers: chosen decoder-layer indices (ascending), to pass as `MoExtendConfig(target_layers=...)`.
    source_experts: `{layer_index: expert_index}` most used expert after router tuning, for `expert_init=...`.
    usage_shift: `{layer_index: std of the usage change}` for every measured layer.
    """

    layers: list[int]
    source_experts: dict[int, int]
    usage_shift: dict[int, float]


def plan_extension(
    usage_before: dict[int, torch.Tensor], usage_after: dict[int, torch.Tensor], fraction: float = 0.5
) -> ExtensionPlan:
    """Choose the `ceil(fraction * num_layers)` layers whose expert-usage distribution shifted most."""
    if not 0 < fraction <= 1:
        raise ValueError(f"`fraction` must be in (0, 1], got {fraction}.")
    if usage_before.keys() != usage_after.keys():
        raise ValueError(
            f"usage_before and usage_after cover different layers: {sorted(usage_before)} vs {sorted(usage_after)}."
        )
    shift = {i: float((usage_after[i] - usage_before[i]).std()) for i in usage_before}
    num_layers = max(1, math.ceil(fraction * len(shift)))
    layers = sorted(sorted(shift, key=lambda i: -shift[i])[:num_layers])
    return ExtensionPlan(layers, {i: int(usage_after[i].argmax()) for i in layers}, shift)


def tune_routers_and_plan(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    steps: int = 50,
    learning_rate: float = 1e-4,
    fraction: float = 0.5,
    restrict_to_modalities: Iterable[str] | None = None,
    keep_tuned_routers: bool = False,
) -> ExtensionPlan:
    """The paper's stage 2 on a plain (not yet extended) MoE model: tune only the routers for `steps` batches of
    new-domain data (with labels), compare expert usage on that data before and after, and plan the extension.

    `restrict_to_modalities`: measure usage only on the tokens of these modalities (pass the value the adapter will
    have in `MoExtendConfig`), as in `measure_expert_usage`.
    `keep_tuned_routers`: False (default): the router weights are restored, the model is left exactly as it was, and
    the adapter trained next applies to the unchanged base checkpoint. True: the routers keep their tuned weights,
    as in the paper's code (its fine-tuning stage starts from the router-tuned checkpoint). This changes the base
    model, and the adapter does not carry the change: save the model (`model.save_pretrained(dir)`) and load the
    adapter onto that checkpoint. `requires_grad` flags are restored either way.
    """
    batches = list(itertools.islice(batches, steps))
    if not batches:
        raise ValueError("`tune_routers_and_plan` needs at least one batch of new-domain data.")
    if "labels" not in batches[0]:
        raise ValueError("Router tuning needs a loss: give batches with `labels`.")
    usage_before = measure_expert_usage(model, batches, restrict_to_modalities=restrict_to_modalities)
    routers = [family.router(block) for block, family in supported_moe_blocks(model).values()]
    saved_state = [copy.deepcopy(router.state_dict()) for router in routers]
    saved_grad = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    tuned = False  # a failed tuning restores the routers even with `keep_tuned_routers`
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        params = [router.weight for router in routers]
        for p in params:
            p.requires_grad_(True)
        optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
        model.train()
        for batch in tqdm(batches, desc="tuning routers", leave=False):
            optimizer.zero_grad()
            model(**batch).loss.backward()
            optimizer.step()
        usage_after = measure_expert_usage(model, batches, restrict_to_modalities=restrict_to_modalities)
        tuned = True
    finally:
        if not (keep_tuned_routers and tuned):
            with torch.no_grad():
                for router, state in zip(routers, saved_state):
                    router.load_state_dict(state)
        for p, flag in saved_grad.items():
            p.requires_grad_(flag)
        model.train(was_training)
    if keep_tuned_routers:
        logger.warning(
            "peft-moextend: kept the tuned weights of %d MoE routers (`keep_tuned_routers=True`, as in the paper's "
            "code): this model now differs from its base checkpoint. Save it (`model.save_pretrained(dir)`) and load "
            "adapters trained on it onto that checkpoint.",
            len(routers),
        )
    return plan_extension(usage_before, usage_after, fraction)
