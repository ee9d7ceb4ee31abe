"""Shared fixtures: a tiny random Llama target with a real byte-level BPE tokenizer and chat template.

Everything is built locally (no Hub access); the embedded SmolLM2-135M target is used only by tests
marked `integration`.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Speculative decoding drafts several tokens and verifies them in one target forward pass.",
    "def add(a, b):\n    return a + b\n",
    "Question: what is 12 plus 30? Answer: 42.",
    "Write a short poem about the sea and the wind.",
] * 20


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_target(vocab_size: int, num_layers: int = 4, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    # Untied and sharper-than-random logits: greedy continuations vary (a tied head echoes the last token).
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model.eval().requires_grad_(False)


@pytest.fixture(autouse=True)
def _calibration_per_test(monkeypatch, tmp_path):
    """The "auto" draft length keeps each drafter's calibration on disk across runs; a test starts from the
    prior, as on a fresh machine, not from what an earlier test or run learned about an identical drafter."""
    from ppow_trl.decoding import speculative

    monkeypatch.setattr(speculative, "cache_root", lambda: tmp_path)


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_target(tiny_tokenizer) -> LlamaForCausalLM:
    return build_tiny_target(len(tiny_tokenizer))


@pytest.fixture(scope="session")
def tiny_target_dir(tmp_path_factory, tiny_target, tiny_tokenizer) -> str:
    """The tiny target and tokenizer saved as a local model directory (what `load_target` reads)."""
    path = tmp_path_factory.mktemp("tiny_target")
    tiny_target.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run fastest on one thread (and the CPU is shared): `pytestmark = usefixtures(...)`."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
