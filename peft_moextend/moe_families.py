"""Registry of supported transformers MoE blocks: how each family routes and how to call its experts.

transformers 5 keeps the experts of a block fused (`experts.gate_up_proj`, `experts.down_proj`), but scoring
differs per family. A family entry tells the shared MoExtend code what it cannot infer from the tensors. Anything
not listed here gets a clear error listing what is supported.

Einstein notation: t - tokens, h - hidden, e - experts, k - top-k slots.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .quantization import parameter_meta, parameter_slice


@dataclass(frozen=True)
class MoEFamily:
    """How one MoE block class routes tokens.

    router_attribute: name of the router submodule on the block.
    scoring: "softmax" (softmax over experts, top-k, optional renormalisation) or "sigmoid" (top-k on logits,
        sigmoid of the chosen logits, Llama 4).
    weights_scale_input: the routing weight multiplies the expert's input instead of its output (Llama 4).
    shared_expert: "none", "sigmoid_gated" (Qwen2-MoE: `sigmoid(shared_expert_gate(x)) * shared_expert(x)`) or
        "plain" (Llama 4: `shared_expert(x)`).
    jitter_attribute: the block attribute holding `j` where the block multiplies its input by uniform noise in
        `[1 - j, 1 + j]` in training (transformers' Mixtral, `config.router_jitter_noise`); None: no jitter.
    """

    name: str
    router_attribute: str
    scoring: str
    weights_scale_input: bool = False
    shared_expert: str = "none"
    jitter_attribute: str | None = None

    def router(self, block: nn.Module) -> nn.Module:
        return getattr(block, self.router_attribute)

    def num_experts(self, block: nn.Module) -> int:
        return parameter_meta(block.experts, "gate_up_proj")[0][0]

    def top_k(self, block: nn.Module) -> int:
        return self.router(block).top_k

    def renormalize(self, block: nn.Module) -> bool:
        return self.scoring == "softmax" and getattr(self.router(block), "norm_topk_prob", True)

    def route(self, block: nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run the block's own router (so transformers' router-logit recording still works).

        hidden: `(t, h)`. Returns logits `(t, e)`, top-k weights `(t, k)` and top-k indices `(t, k)`.
        """
        return self.read_router_output(block, self.router(block)(hidden))

    def router_logits(self, output: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """The logits `(t, e)` in the output of the block's router: `(scores, logits)` for sigmoid families (Llama 4),
        `(logits, top_k_weights, top_k_index)` for softmax ones."""
        return output[1] if self.scoring == "sigmoid" else output[0]

    def read_router_output(
        self, block: nn.Module, output: tuple[torch.Tensor, ...]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits `(t, e)`, top-k weights `(t, k)` and top-k indices `(t, k)` from the output of the block's router
        (e.g. as seen by a forward hook on `router(block)`)."""
        logits = self.router_logits(output)
        if self.scoring == "sigmoid":
            scores = output[0]  # (t, e), sigmoid of the top-k logits and 0 elsewhere
            top_k_index = torch.topk(logits, self.top_k(block), dim=-1).indices
            return logits, scores.gather(1, top_k_index), top_k_index
        return logits, output[1], output[2]

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Routing scores `(t, e)` on which top-k is taken."""
        if self.scoring == "sigmoid":
            return torch.sigmoid(logits.float())
        return F.softmax(logits.float(), dim=-1)

    def top_k_index(self, logits: torch.Tensor, top_k: int, probabilities: torch.Tensor | None = None) -> torch.Tensor:
        """`(t, k)` experts the family picks from logits `(t, e)`: top-k of the softmax probabilities, or for sigmoid
        families (Llama 4) of the raw logits (their sigmoids tie once they saturate at 1). `probabilities`: those of
        `logits` if already computed."""
        if self.scoring == "sigmoid":
            ranking = logits.float()
        else:
            ranking = self.probabilities(logits) if probabilities is None else probabilities
        return torch.topk(ranking, top_k, dim=-1).indices

    def routed_experts(
        self, block: nn.Module, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """The block's own experts on `(t, h)` tokens with `(t, k)` indices < e and weights; returns `(t, h)`."""
        if self.weights_scale_input:
            num_experts = self.num_experts(block)
            # scatter_add: slots MoExtend sends to new experts arrive here as expert 0 with weight 0, and a plain
            # scatter with that duplicate index could overwrite expert 0's real weight
            scores = hidden.new_zeros(hidden.shape[0], num_experts).scatter_add(1, top_k_index, top_k_weights)  # (t, e)
            routed_in = hidden.repeat(num_experts, 1) * scores.transpose(0, 1).reshape(-1, 1)
            return block.experts(routed_in).reshape(num_experts, hidden.shape[0], -1).sum(dim=0)
        return block.experts(hidden, top_k_index, top_k_weights)

    def jitter(self, block: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        """The block's input `(..., h)` with the block's own router jitter applied, in training only (transformers'
        Mixtral applies it before its router and its experts)."""
        noise = getattr(block, self.jitter_attribute, 0.0) if self.jitter_attribute is not None else 0.0
        if not (block.training and noise > 0):
            return hidden_states
        return hidden_states * torch.empty_like(hidden_states).uniform_(1.0 - noise, 1.0 + noise)

    def add_shared_expert(self, block: nn.Module, hidden: torch.Tensor, routed: torch.Tensor) -> torch.Tensor:
        """Add the shared expert's output `(t, h)` in the order the block itself does."""
        if self.shared_expert == "sigmoid_gated":
            shared = block.shared_expert(hidden)
            return routed + F.sigmoid(block.shared_expert_gate(hidden)) * shared
        if self.shared_expert == "plain":
            out = block.shared_expert(hidden)
            out.add_(routed)
            return out
        return routed


_SOFTMAX = {"router_attribute": "gate", "scoring": "softmax"}
MOE_FAMILIES: dict[str, MoEFamily] = {
    "MixtralSparseMoeBlock": MoEFamily("mixtral", jitter_attribute="jitter_noise", **_SOFTMAX),
    "Qwen2MoeSparseMoeBlock": MoEFamily("qwen2_moe", shared_expert="sigmoid_gated", **_SOFTMAX),
    "Qwen3MoeSparseMoeBlock": MoEFamily("qwen3_moe", **_SOFTMAX),
    "OlmoeSparseMoeBlock": MoEFamily("olmoe", **_SOFTMAX),
    "Qwen3VLMoeTextSparseMoeBlock": MoEFamily("qwen3_vl_moe", **_SOFTMAX),
    "Llama4TextMoe": MoEFamily(
        "llama4", router_attribute="router", scoring="sigmoid", weights_scale_input=True, shared_expert="plain"
    ),
}
"""Supported MoE block classes (by class name) and their family."""


def experts_are_transposed(experts: nn.Module) -> bool:
    """Whether fused expert weights are stored `(e, h, 2i)` / `(e, i, h)` instead of `(e, 2i, h)` / `(e, h, i)`.

    Llama 4 uses the transposed layout without declaring it; detect the hidden size in dim 1 of `gate_up_proj`.
    """
    if hasattr(experts, "is_transposed"):
        return experts.is_transposed
    return parameter_meta(experts, "gate_up_proj")[0][1] == parameter_meta(experts, "down_proj")[0][-1]


def hidden_size_of(experts: nn.Module) -> int:
    """Hidden size of a fused experts module (from its tensors' shapes; nothing is dequantized)."""
    shape = parameter_meta(experts, "gate_up_proj")[0]
    return shape[1] if experts_are_transposed(experts) else shape[-1]


def expert_weights(experts: nn.Module, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert `index`'s `(gate_up, down)` weights in the module's layout (dequantized alone if stored in 4 bits)."""
    return parameter_slice(experts, "gate_up_proj", index), parameter_slice(experts, "down_proj", index)


_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def decoder_layer_index(block_name: str, position: int) -> int:
    """Decoder-layer index of the MoE block at `block_name` (`...layers.<i>...`), else its position among blocks."""
    match = _LAYER_INDEX.search(f".{block_name}.")
    return int(match.group(1)) if match else position


def family_of(module: nn.Module) -> MoEFamily | None:
    """The family of a supported MoE block, else None."""
    return MOE_FAMILIES.get(type(module).__name__)


def looks_like_moe_block(module: nn.Module) -> bool:
    """A module that holds routed experts (fused or as a list) next to a router: supported or not."""
    has_experts = hasattr(module, "experts") and not isinstance(module, nn.ModuleDict)
    has_router = any(hasattr(module, name) for name in ("gate", "router"))
    return has_experts and has_router


def find_moe_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """All MoE-looking blocks of `model`, outermost first, as (qualified name, module). A block wrapped by a tuner
    layer is found as its `...base_layer`; `moe_blocks` names it by its wrapper."""
    blocks: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if looks_like_moe_block(module) and not any(name.startswith(f"{outer}.") for outer, _ in blocks):
            blocks.append((name, module))
    return blocks


@dataclass(frozen=True)
class MoEBlock:
    """One MoE block of a model.

    name: qualified name of the block, or of the tuner layer wrapping it (PEFT's `base_layer` convention, e.g.
        `MoExtendLayer`); module: the module at `name` (the block or its wrapper); block: the MoE block itself;
    layer_index: index of its decoder layer (`...layers.<i>...`), else its position among the MoE blocks;
    family: its `MoEFamily`, None where the block class is not supported.
    """

    name: str
    module: nn.Module
    block: nn.Module
    layer_index: int
    family: MoEFamily | None


def moe_blocks(model: nn.Module) -> list[MoEBlock]:
    """Every MoE-looking block of `model` (supported or not, wrapped or not), in module order."""
    found = []
    for position, (name, block) in enumerate(find_moe_blocks(model)):
        owner = name.removesuffix(".base_layer")
        module = block if owner == name else model.get_submodule(owner)
        found.append(MoEBlock(owner, module, block, decoder_layer_index(owner, position), family_of(block)))
    return found


def supported_blocks_message() -> str:
    families: dict[str, list[str]] = {}
    for cls_name, family in MOE_FAMILIES.items():
        families.setdefault(family.name, []).append(cls_name)
    return ", ".join(f"{name} ({'/'.join(classes)})" for name, classes in families.items())
