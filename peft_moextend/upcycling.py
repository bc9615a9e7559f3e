"""Sparse upcycling of a dense Llama into a Mixtral MoE.

Sparse upcycling (Komatsuzaki et al., 2023; used by MoE-LLaVA) turns every dense MLP into ``E`` identical experts
behind a freshly initialised router. Because the experts are identical and Mixtral renormalises the top-k routing
weights to sum to one, the upcycled model computes the dense model's function (up to float32 rounding, ~1e-4 on the
logits) until training makes the experts diverge.
"""

from __future__ import annotations

import copy

import torch
from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM
from transformers.initialization import no_init_weights

__all__ = ["upcycle_llama_to_mixtral"]


def _mixtral_config(dense_config: LlamaConfig, num_experts: int, num_experts_per_tok: int) -> MixtralConfig:
    """Mixtral config with the dense Llama's architecture and ``num_experts`` experts per layer."""
    if dense_config.attention_bias or dense_config.mlp_bias:
        raise ValueError("Mixtral has no attention/MLP biases; cannot upcycle a Llama with attention_bias/mlp_bias.")
    if dense_config.hidden_act != "silu":
        raise ValueError(f"Expected a SiLU-gated Llama MLP, got hidden_act={dense_config.hidden_act!r}.")
    return MixtralConfig(
        vocab_size=dense_config.vocab_size,
        hidden_size=dense_config.hidden_size,
        intermediate_size=dense_config.intermediate_size,
        num_hidden_layers=dense_config.num_hidden_layers,
        num_attention_heads=dense_config.num_attention_heads,
        num_key_value_heads=dense_config.num_key_value_heads,
        head_dim=getattr(dense_config, "head_dim", None),
        hidden_act=dense_config.hidden_act,
        max_position_embeddings=dense_config.max_position_embeddings,
        initializer_range=dense_config.initializer_range,
        rms_norm_eps=dense_config.rms_norm_eps,
        pad_token_id=dense_config.pad_token_id,
        bos_token_id=dense_config.bos_token_id,
        eos_token_id=dense_config.eos_token_id,
        tie_word_embeddings=dense_config.tie_word_embeddings,
        attention_dropout=dense_config.attention_dropout,
        rope_parameters=copy.deepcopy(dense_config.rope_parameters),
        sliding_window=None,
        num_local_experts=num_experts,
        num_experts_per_tok=num_experts_per_tok,
        router_jitter_noise=0.0,
    )


@torch.no_grad()
def upcycle_llama_to_mixtral(
    dense: LlamaForCausalLM,
    num_experts: int = 4,
    num_experts_per_tok: int = 2,
    router_std: float = 0.02,
    seed: int = 0,
) -> MixtralForCausalLM:
    """Sparse-upcycle a dense Llama into a Mixtral whose experts are all copies of the dense MLP.

    Attention, RMSNorms, embeddings and ``lm_head`` are copied unchanged. Per layer, with ``E = num_experts``,
    ``H = hidden_size`` and ``I = intermediate_size``:

    * ``mlp.experts.gate_up_proj`` (E, 2I, H) = ``cat([gate_proj.weight, up_proj.weight], dim=0)`` for every expert;
    * ``mlp.experts.down_proj`` (E, H, I) = ``down_proj.weight`` for every expert;
    * ``mlp.gate.weight`` (E, H) ~ N(0, router_std**2), drawn from a generator seeded with ``seed``.

    Since the top-k routing weights are renormalised to sum to one, the result reproduces the dense logits
    (up to float rounding). The dense model is left untouched.

    Returns:
        The upcycled model in float32, eval mode, on the dense model's device, with a copy of its
        ``generation_config``.
    """
    if not 1 <= num_experts_per_tok <= num_experts:
        raise ValueError(f"Need 1 <= num_experts_per_tok <= num_experts, got {num_experts_per_tok}, {num_experts}.")
    config = _mixtral_config(dense.config, num_experts, num_experts_per_tok)
    # Every parameter is overwritten by the strict load below, so skip the (slow, ~5 s) random init; the rotary
    # buffers are still computed in __init__. Skipping init also skips tying, hence the explicit tie_weights().
    with no_init_weights():
        model = MixtralForCausalLM(config)
    model.tie_weights()

    generator = torch.Generator().manual_seed(seed)
    state = {name: tensor for name, tensor in dense.state_dict().items() if ".mlp." not in name}
    for i, layer in enumerate(dense.model.layers):
        prefix = f"model.layers.{i}.mlp"
        gate_up = torch.cat([layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight], dim=0)  # (2I, H)
        state[f"{prefix}.gate.weight"] = torch.randn(num_experts, config.hidden_size, generator=generator) * router_std
        state[f"{prefix}.experts.gate_up_proj"] = gate_up.expand(num_experts, -1, -1)
        state[f"{prefix}.experts.down_proj"] = layer.mlp.down_proj.weight.expand(num_experts, -1, -1)  # (E, H, I)
    model.load_state_dict(state, strict=True)

    model.generation_config = copy.deepcopy(dense.generation_config)
    return model.to(device=dense.device, dtype=torch.float32).eval()
