"""MoExtend tuner: finds the MoE blocks of a transformers model and wraps the chosen ones in `MoExtendLayer`."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..moe_families import MoEBlock, hidden_size_of, moe_blocks, supported_blocks_message
from ..registration import METHODS, ExpertPeftType
from ..tuner_utils import ExpertTuner
from .config import MoExtendConfig
from .export import append_new_experts, check_exportable, update_config
from .extension import measure_expert_usage
from .layer import MoExtendLayer, MoExtendSettings

logger = logging.getLogger("peft_moextend")


class MoExtendModel(ExpertTuner):
    """Adds new experts to the MoE layers of a pretrained transformers MoE model.

    Use through `peft.get_peft_model(model, MoExtendConfig(...))` after `import peft_moextend`. `forward` and
    `generate` accept `modality_ids` (`(batch, seq)` ints indexing `peft_moextend.modality.MODALITIES`), which
    overrides the placeholder-token derivation. The load-balancing loss over old + new experts is returned as
    `outputs.router_aux_loss` and, times `router_aux_loss_coef`, added to `outputs.loss` when labels are given
    (see `peft_moextend.call_inputs`).
    """

    prefix: str = METHODS[ExpertPeftType.MOEXTEND].prefix
    tuner_layer_cls = MoExtendLayer
    method_name = METHODS[ExpertPeftType.MOEXTEND].name
    merge_refusal = (
        "merging into the existing weights has no room for new experts; `merge_and_unload()` instead exports the "
        "model to the same MoE class with the new experts appended."
    )

    # -- export ------------------------------------------------------------------------------------------------
    def merge_and_unload(
        self, progressbar: bool = False, safe_merge: bool = False, adapter_names: list[str] | None = None
    ) -> nn.Module:
        """The base model as a plain transformers MoE with the adapter's new experts appended to every MoE block
        (expert tensors concatenated, router rows appended, the config's expert count updated): `save_pretrained`
        writes a checkpoint that transformers loads without this package, with the adapted model's outputs.

        `adapter_names`: the one adapter to export (default: the active adapter). Refused, with the option to
        change, where the plain MoE cannot express the routing exactly (calibration, `restrict_to_modalities`, not
        every MoE layer extended alike) or the experts are stored in 4 bits."""
        names = list(adapter_names) if adapter_names is not None else list(self.active_adapters)
        if len(names) != 1:
            raise ValueError(
                f"merge_and_unload() exports one MoExtend adapter into the base MoE, but {names} were given/active; "
                "pass `adapter_names=[name]` with the adapter to export."
            )
        adapter_name = names[0]
        if adapter_name not in self.peft_config:
            raise ValueError(f"No adapter {adapter_name!r}; adapters: {list(self.peft_config)}.")
        blocks = moe_blocks(self.model)
        added = check_exportable(blocks, adapter_name, self.peft_config[adapter_name])
        layers = [b.module for b in blocks if isinstance(b.module, MoExtendLayer)]
        old = layers[0].num_base_experts
        for layer in layers:
            append_new_experts(layer, adapter_name)
        update_config(self.model, old, old + added)
        return self.unload()

    # -- injection ---------------------------------------------------------------------------------------------
    def _moe_blocks(self, model: nn.Module) -> dict[str, MoEBlock]:
        """The MoE blocks by qualified name (of their MoExtendLayer once wrapped); clear errors unless every one is
        supported."""
        found = moe_blocks(model)
        model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        if not found:
            raise ValueError(
                f"MoExtend adds experts to the MoE layers of a pretrained MoE model, but this {model_type!r} model "
                f"({type(model).__name__}) has no MoE layer. Supported MoE blocks: {supported_blocks_message()}. "
                "For a dense model, upcycle it into an MoE first with "
                "`peft_moextend.upcycling.upcycle_llama_to_mixtral`."
            )
        unsupported = next((b for b in found if b.family is None), None)
        if unsupported is not None:
            raise ValueError(
                f"MoE block {type(unsupported.block).__name__} (at {unsupported.name!r}, model type {model_type!r}) is "
                f"not supported by MoExtend. Supported MoE blocks: {supported_blocks_message()}."
            )
        return {b.name: b for b in found}

    def _prepare_model(self, peft_config: MoExtendConfig, model: nn.Module) -> None:
        blocks = self._moe_blocks(model)
        by_layer = {b.layer_index: name for name, b in blocks.items()}
        if peft_config.target_layers is not None:
            missing = [i for i in peft_config.target_layers if i not in by_layer]
            if missing:
                raise ValueError(
                    f"`target_layers` {missing} are not MoE layers of this model; its MoE layers are "
                    f"{sorted(by_layer)}."
                )
            chosen = [by_layer[i] for i in peft_config.target_layers]
        else:
            chosen = list(blocks)
        first = blocks[chosen[0]]
        num_experts = first.family.num_experts(first.block)
        hidden_size = hidden_size_of(first.block.experts)
        for option, expected, actual in (
            ("num_base_experts", peft_config.num_base_experts, num_experts),
            ("hidden_size", peft_config.hidden_size, hidden_size),
        ):
            if expected is not None and expected != actual:
                raise ValueError(
                    f"This MoExtend adapter was created for a base model with {option}={expected}, but this model has "
                    f"{option}={actual}. Load it onto the base model it was trained on (see "
                    f"`base_model_name_or_path` in adapter_config.json)."
                )
        peft_config.num_base_experts, peft_config.hidden_size = num_experts, hidden_size
        # "all": the blocks the adapter does not extend are wrapped too, to record their routing for the aux loss
        wrapped = list(blocks) if peft_config.router_aux_loss_layers == "all" else chosen
        peft_config.target_modules = "|".join(re.escape(name) for name in wrapped)
        self._blocks = blocks
        if peft_config.expert_init in ("expert_0_until_measured", "zeros") and not peft_config.inference_mode:
            logger.warning(
                "peft-moextend: the new experts of MoExtend layers %s start as copies of expert 0 "
                "(expert_init=%r). Call `model.base_model.init_new_experts_from_data(batches)` before training to copy "
                "each layer's most used expert on your data instead (the paper's choice), or pass an expert index / "
                "{layer_index: expert_index} (e.g. from `tune_routers_and_plan`) as `expert_init`.",
                sorted(blocks[name].layer_index for name in chosen),
                peft_config.expert_init,
            )

    @staticmethod
    def _source_expert(config: MoExtendConfig, layer_index: int) -> int:
        init = config.expert_init
        if isinstance(init, dict):
            return init.get(layer_index, 0)
        return init if isinstance(init, int) else 0

    def _create_and_replace(
        self,
        peft_config: MoExtendConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        moe_block = self._blocks[current_key]
        layer_index = moe_block.layer_index
        layer = (
            target
            if isinstance(target, MoExtendLayer)
            else MoExtendLayer(target, moe_block.family, layer_index, self.call_inputs)
        )
        if peft_config.target_layers is None or layer_index in peft_config.target_layers:
            layer.update_layer(adapter_name, peft_config, self._source_expert(peft_config, layer_index))
        else:  # router_aux_loss_layers="all": a block this adapter does not extend
            layer.update_observer(adapter_name, peft_config)
        if layer is not target:
            self._install_layer(parent, target_name, target, layer, adapter_name)

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        # BaseTuner's version moves the new module to `child.weight`'s device; an MoE block has no `weight`, and
        # MoExtendLayer already placed its tensors next to the block's experts.
        setattr(parent, child_name, new_module)

    # -- expert initialisation from data ---------------------------------------------------------------------
    @torch.no_grad()
    def init_new_experts_from_data(
        self, batches: Iterable[dict[str, torch.Tensor]], adapter_name: str | None = None
    ) -> dict[int, int]:
        """Re-initialise the newest new experts of `adapter_name` (its latest stage) from each extended layer's most
        used expert on `batches`.

        Usage is measured with the adapter disabled (the base model's routing), over the tokens the new experts will
        serve: with `restrict_to_modalities`, only tokens of those modalities (marked by the model's placeholder
        tokens or a `modality_ids` entry in the batches); padding never counts. Call before training. Returns
        `{layer_index: source_expert}` for the extended layers and records it in the config (`expert_init` for stage
        0, unless it is "zeros"; the stage's `source_experts` for a later stage).
        """
        adapter_name = adapter_name or self.active_adapters[0]
        config = self.peft_config[adapter_name]
        stage = len(config.stages)
        served = config.stage_modalities()[stage]
        with self._disabled_adapters():
            usage = measure_expert_usage(self.model, batches, restrict_to_modalities=served)
        layers = [layer for layer in self._layers() if layer.extends(adapter_name)]
        unseen = [layer.layer_index for layer in layers if not bool(usage[layer.layer_index].sum() > 0)]
        if unseen:
            raise ValueError(
                f"`init_new_experts_from_data` saw no token that the new experts serve ({served or 'any'} tokens, not "
                f"padding) in MoE layers {unseen}, so it cannot tell which expert is most used. Give batches that "
                "contain such tokens (marked by the model's placeholder tokens or a `modality_ids` entry)."
            )
        sources = {layer.layer_index: int(usage[layer.layer_index].argmax()) for layer in layers}
        for layer in layers:
            layer.copy_expert_into_new(
                adapter_name, sources[layer.layer_index], zero_down_proj=config.expert_init == "zeros", k=stage
            )
        if stage:
            config.stages[-1]["source_experts"] = dict(sources)
        elif config.expert_init != "zeros":
            config.expert_init = dict(sources)
        return sources

    # -- stages: task and modality extension ------------------------------------------------------------------
    def add_stage(
        self,
        name: str,
        batches: Iterable[dict[str, torch.Tensor]] | None = None,
        num_new_experts: int | None = None,
        restrict_to_modalities: list[str] | None = None,
        adapter_name: str | None = None,
    ) -> dict:
        """Add a stage of new experts to adapter `adapter_name` (default: the active one), for a new task or a new
        modality: `num_new_experts` (default: the adapter's) more experts and router rows in every extended layer,
        copying the source experts of stage 0 or, with `batches`, each layer's most used expert on them (see
        `init_new_experts_from_data`). The earlier stages are frozen; one router routes over the base experts and
        every stage's. `restrict_to_modalities`: the modalities this stage serves (default: the adapter's). Returns
        `{"stage": k, "source_experts": {layer_index: expert_index}}`."""
        adapter_name = adapter_name or self.active_adapters[0]
        if adapter_name not in self.peft_config:
            raise ValueError(f"No adapter {adapter_name!r}; adapters: {list(self.peft_config)}.")
        config = self.peft_config[adapter_name]
        layers = [layer for layer in self._layers() if layer.extends(adapter_name)]
        sources = {layer.layer_index: self._source_expert(config, layer.layer_index) for layer in layers}
        stage = MoExtendConfig._normalise_stage(
            {
                "name": name,
                "num_new_experts": config.num_new_experts if num_new_experts is None else num_new_experts,
                "restrict_to_modalities": config.restrict_to_modalities
                if restrict_to_modalities is None
                else restrict_to_modalities,
                "source_experts": sources,
            }
        )
        if any(existing["name"] == name for existing in config.stages):
            raise ValueError(
                f"Adapter {adapter_name!r} already has a stage {name!r}; stages so far: "
                f"{[s['name'] for s in config.stages]}. Give each stage a new name."
            )
        config.stages.append(stage)
        k = len(config.stages)
        for layer in self._layers():
            if adapter_name in layer.moextend_settings:
                layer.moextend_settings[adapter_name] = MoExtendSettings.of(config)
        for layer in layers:
            layer.create_stage(adapter_name, k, config, stage["num_new_experts"], sources[layer.layer_index])
        self._cast_new_stage(adapter_name)
        if batches is not None:
            sources = self.init_new_experts_from_data(batches, adapter_name)
        return {"stage": k, "source_experts": sources}
