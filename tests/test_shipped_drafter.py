"""The EAGLE-3 warm start shipped in drafters/ (built by `make warmstart`): small, complete, for its target,
and a drafter that its target accepts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from ppow_trl.decoding import generate
from ppow_trl.export import load_drafter
from ppow_trl.models import Eagle3Drafter
from ppow_trl.target import load_target

SHIPPED = Path(__file__).resolve().parents[1] / "drafters" / "smollm2-135m-eagle3"


def test_shipped_drafter_is_small_bf16_and_carries_its_card():
    weights = SHIPPED / "model.safetensors"
    assert weights.stat().st_size < 30 * 2**20
    with safe_open(weights, "pt") as f:
        names = set(f.keys())
        dtypes = {f.get_slice(n).get_dtype() for n in names if n not in ("d2t", "t2d")}
    assert "embed_tokens.weight" not in names and {"fc.weight", "lm_head.weight", "d2t"} <= names
    assert dtypes == {"BF16"}
    config = json.loads((SHIPPED / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLMEagle3"]
    card = (SHIPPED / "README.md").read_text()
    assert "SmolLM2-135M-Instruct" in card and "tau" in card.lower()


@pytest.mark.integration
def test_shipped_drafter_loads_for_the_embedded_target_and_is_accepted():
    target, tokenizer = load_target("embedded")
    drafter = load_drafter(SHIPPED, target)
    assert isinstance(drafter, Eagle3Drafter) and drafter.config.draft_vocab_size < target.config.vocab_size
    torch.testing.assert_close(drafter.embed_tokens.weight, target.get_input_embeddings().weight)
    messages = [{"role": "user", "content": "Explain in two sentences why the sky is blue."}]
    ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    ids = ids["input_ids"]
    eos = tokenizer.eos_token_id
    plain = target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=64, do_sample=False,
                            eos_token_id=eos, pad_token_id=eos)  # fmt: skip
    out = generate(
        target, drafter, ids, num_draft_tokens=3, method="loop", max_new_tokens=64, eos_token_id=eos
    )
    assert torch.equal(out.sequences, plain)  # lossless
    untrained = Eagle3Drafter(drafter.config)  # same architecture and vocabulary, layer not trained
    untrained.set_draft_vocab(drafter.d2t, drafter.t2d)
    untrained.init_from_target(target)
    base = generate(
        target, untrained.eval(), ids, num_draft_tokens=3, method="loop", max_new_tokens=64, eos_token_id=eos
    )
    assert torch.equal(base.sequences, plain)
    assert out.tau >= base.tau + 0.08, (out.tau, base.tau)  # training is what gets its drafts accepted
