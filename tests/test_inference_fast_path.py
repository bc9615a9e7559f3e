"""The inference fast path of SMoLA and ModeX (eval, no autograd, every token of the call of one modality, as at
every decoding step of `generate`) reads no per-token modality ids and gives the general path's outputs."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from tiny_vlms import make_tiny_vlm, make_vlm_inputs

from peft_moextend import ModeXConfig, SMoLAConfig
from peft_moextend.call_inputs import CallInputs
from peft_moextend.modality import modality_ids_from_input_ids, modality_token_ids

CONFIGS = {
    # text and multimodal groups act on text tokens, the image group between them does not: all experts run
    "smola": lambda: SMoLAConfig(r=2, expert_groups={"text": 2, "image": 3, "multimodal": 2}),
    # the text group alone acts on text tokens: only its block of experts runs (views of the weights)
    "smola_block": lambda: SMoLAConfig(r=2, expert_groups={"text": 2, "image": 3}),
    "modex": lambda: ModeXConfig(experts={"text": ["text"], "visual": ["image"], "cross_modal": None}),
}
UP_PROJECTIONS = {"smola": "smola_B", "smola_block": "smola_B", "modex": "modex_up"}


def assert_same(fast: torch.Tensor, general: torch.Tensor, method: str) -> None:
    """Bit for bit, except SMoLA's block of experts: its up projection sums over fewer (only non-zero) terms."""
    if method == "smola_block":
        torch.testing.assert_close(fast, general, rtol=1e-6, atol=1e-6)
    else:
        assert torch.equal(fast, general)


def adapted_in_eval(method: str):
    """A tiny llava with `method`'s adapter, non-zero up projections (so that every expert matters), in eval."""
    model = get_peft_model(make_tiny_vlm("llava"), CONFIGS[method]())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if UP_PROJECTIONS[method] in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    return model.eval()


@pytest.fixture
def id_requests(monkeypatch) -> list[int]:
    """The token counts of the layers' requests for per-token modality ids (the general path's)."""
    requests = []
    general = CallInputs.layer_modality_ids

    def counted(self, num_tokens, *args, **kwargs):
        requests.append(num_tokens)
        return general(self, num_tokens, *args, **kwargs)

    monkeypatch.setattr(CallInputs, "layer_modality_ids", counted)
    return requests


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_a_text_only_call_takes_the_fast_path_with_the_general_paths_outputs(method, id_requests):
    model = adapted_in_eval(method)
    text = make_vlm_inputs(model, "llava", with_media=False)
    with torch.no_grad():
        fast = model(**text).logits
    assert id_requests == []
    general = model(**text).logits.detach()  # autograd on: the general path
    assert id_requests  # which asks every layer's token modalities
    assert_same(fast, general, method)


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_decoding_steps_after_a_mixed_prompt_take_the_fast_path_with_the_same_tokens(method, id_requests):
    model = adapted_in_eval(method)
    batch = make_vlm_inputs(model, "llava")
    batch.pop("labels")
    # explicit ids: the decoding steps' tokens are text whatever they are (a random model may emit a placeholder)
    batch["modality_ids"] = modality_ids_from_input_ids(batch["input_ids"], modality_token_ids(model.config))
    settings = {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False, "output_logits": True}
    fast = model.generate(**batch, **settings, return_dict_in_generate=True)
    assert set(id_requests) == {batch["input_ids"].numel()}  # only the prompt asked; the decoding steps did not
    model.train()  # the general path at every step (no dropout in these configs)
    general = model.generate(**batch, **settings, return_dict_in_generate=True)
    assert set(id_requests) == {batch["input_ids"].numel(), batch["input_ids"].shape[0]}  # and every step did
    assert torch.equal(fast.sequences, general.sequences)
    assert_same(torch.stack(fast.logits), torch.stack(general.logits), method)
