"""Supervised drafter warm start: objectives, target labels, the TTT loss, training, resume, LoRA, recipe."""

from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file
from transformers import AutoModel

from ppow_trl.data import DataConfig, TargetFeatureProvider, build_training_data, collate_sequences
from ppow_trl.data.draft_vocab import build_draft_vocab
from ppow_trl.decoding.drafting import draft_windows, window_targets
from ppow_trl.models import DrafterTargetMismatchError, Eagle3Drafter
from ppow_trl.models.build import build_drafter
from ppow_trl.training import DrafterSFTConfig, DrafterSFTTrainer
from ppow_trl.training.losses import (
    acceptance_rate,
    drafter_loss,
    expected_accepted_length,
    forward_kl,
    soft_cross_entropy,
    step_weights,
    target_labels,
    window_loss,
)
from ppow_trl.training.script_args import train_save_evaluate
from tests.conftest import build_tiny_target

ROOT = Path(__file__).resolve().parents[1]
K = 3
WORDS = ["fox", "sea", "wind", "add", "poem", "dog", "verify", "tokens", "river", "code"]


def write_prompts(path: Path, count: int) -> Path:
    with path.open("w") as handle:
        for i in range(count):
            prompt = f"Write about the {WORDS[i % 10]} and the {WORDS[(3 * i + 1) % 10]}, number {i}."
            handle.write(json.dumps({"id": f"p{i}", "prompt": prompt}) + "\n")  # ids fix the split
    return path


@pytest.fixture(scope="module")
def sft_target(tiny_tokenizer):
    """The tiny target with seed 1: its greedy answers use ~60 distinct tokens (seed 0: ~10)."""
    return build_tiny_target(len(tiny_tokenizer), seed=1)


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory, sft_target, tiny_tokenizer):
    """~30 regenerated conversations through the real data pipeline, draft vocabulary of 64 ids."""
    root = tmp_path_factory.mktemp("sft_data")
    config = DataConfig(
        dataset_name=str(write_prompts(root / "prompts.jsonl", 40)),
        max_new_tokens=24,
        draft_vocab_size=64,
        eval_fraction=0.25,
        cache_dir=str(root / "cache"),
    )
    return build_training_data(config, sft_target, tiny_tokenizer, progress=False)


def make_args(tmp_path: Path, **overrides) -> DrafterSFTConfig:
    values = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=30,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        learning_rate=1e-3,
        window_size=K,
        eval_window_size=K,
        logging_steps=5,
        save_strategy="no",
        disable_tqdm=True,
        dataloader_pin_memory=False,
        seed=0,
    )
    values.update(overrides)
    return DrafterSFTConfig(**values)


def make_trainer(kind, target, data, args, tokenizer, **kwargs) -> DrafterSFTTrainer:
    torch.manual_seed(0)
    options = {"num_heads": K} if kind == "medusa" else {}
    drafter = build_drafter(kind, target, data.draft_vocab, **options)
    return DrafterSFTTrainer(
        drafter,
        target,
        args,
        train_dataset=data.train,
        eval_dataset=data.eval,
        processing_class=tokenizer,
        **kwargs,
    )


def train_losses(trainer: DrafterSFTTrainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


# ----------------------------------------------------------------------------------------------- objectives
def test_objectives_follow_their_definitions():
    g = torch.Generator().manual_seed(0)
    draft, target = torch.randn(6, 10, generator=g), torch.randn(6, 10, generator=g)
    p, log_q = torch.softmax(target, -1), torch.log_softmax(draft, -1)
    entropy = -(p * p.log()).sum(-1)
    torch.testing.assert_close(soft_cross_entropy(draft, target), -(p * log_q).sum(-1))
    torch.testing.assert_close(forward_kl(draft, target), soft_cross_entropy(draft, target) - entropy)
    torch.testing.assert_close(forward_kl(target, target), torch.zeros(6), atol=1e-6, rtol=0)
    torch.testing.assert_close(acceptance_rate(target, target), torch.ones(6))
    torch.testing.assert_close(
        drafter_loss("acceptance", draft, target), 1 - torch.minimum(p, log_q.exp()).sum(-1)
    )
    # With the full-vocabulary logsumexp, p is the true probability: a drafter equal to the renormalised
    # target is accepted with exactly the draft vocabulary's mass.
    full_lse = torch.logsumexp(torch.cat([target, torch.randn(6, 30, generator=g)], -1), -1)
    mass = torch.exp(torch.logsumexp(target, -1) - full_lse)
    torch.testing.assert_close(acceptance_rate(target, target, full_lse), mass)
    torch.testing.assert_close(step_weights(3, 0.8), torch.tensor([1.0, 0.8, 0.64]))
    with pytest.raises(ValueError, match="unknown loss"):
        drafter_loss("mse", draft, target)


def test_window_objective_by_hand():
    q = torch.tensor([[0.5, 0.4, 0.9], [0.5, 0.4, 0.9], [0.5, 0.4, 0.9]])
    scored = torch.tensor([[True, True, True], [True, False, True], [False, True, True]])
    # E[R] = q1 + q1 q2 + q1 q2 q3; a window ends at its first unscored depth.
    expected = expected_accepted_length(q.log(), scored)
    torch.testing.assert_close(expected, torch.tensor([0.5 + 0.2 + 0.18, 0.5, 0.0]))
    loss, same = window_loss(q.log(), scored)
    torch.testing.assert_close(same, expected)
    torch.testing.assert_close(loss, torch.tensor([(3 - 0.88) / 3, (1 - 0.5) / 3, 0.0]))

    # Descending the loss raises q of the target token at every scored depth and lowers the others.
    logits = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(0), requires_grad=True)
    targets = torch.tensor([[1, 4, 0], [2, 2, 3]])
    scored = torch.tensor([[True, True, True], [True, True, False]])
    logq = torch.log_softmax(logits / 0.7, -1).gather(-1, targets[..., None]).squeeze(-1)
    window_loss(logq, scored)[0].sum().backward()
    on_target = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, targets[..., None], True)
    grad = logits.grad[scored]
    assert bool((grad[on_target[scored]] < 0).all()) and bool((grad[~on_target[scored]] > 0).all())
    assert bool((logits.grad[~scored] == 0).all())  # past the window's end nothing is trained
    with torch.no_grad():
        stepped = logits - 0.1 * logits.grad
    assert bool((torch.softmax(stepped, -1) > torch.softmax(logits, -1))[on_target & scored[..., None]].all())


@pytest.mark.parametrize("chunk_size", [7, 50, 64])
def test_target_labels_match_the_full_lm_head(chunk_size):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=True)
    hidden = torch.randn(2, 5, 16)
    ids = torch.tensor([0, 3, 4, 17, 20, 21, 48, 49])
    labels = target_labels(hidden, head, ids, chunk_size)
    full = head(hidden)
    torch.testing.assert_close(labels.logits, full[..., ids])
    torch.testing.assert_close(labels.logsumexp, torch.logsumexp(full, -1))
    assert torch.equal(labels.argmax, full.argmax(-1))


def test_ttt_loss_matches_an_explicit_reference(tmp_path, sft_target, sft_data, tiny_tokenizer):
    """Label of step j at row r = target distribution at r+1+j on the draft vocabulary; mask =
    loss_mask[r+2+j] (the predicted token) * real(r+1+j) * [full argmax in draft vocab]; weights 0.8^j;
    denominator = real tokens."""
    # A 24-id draft vocabulary leaves some target argmaxes outside it: those rows must get no loss.
    train = sft_data.train
    vocab = build_draft_vocab(
        draft_vocab_size=24,
        vocab_size=len(tiny_tokenizer),
        sequences=train["input_ids"],
        loss_masks=train["loss_mask"],
    )
    torch.manual_seed(0)
    drafter = build_drafter("eagle3", sft_target, vocab)
    trainer = DrafterSFTTrainer(drafter, sft_target, make_args(tmp_path), train_dataset=train)
    batch = collate_sequences([train[i] for i in (0, 5)], tiny_tokenizer.pad_token_id)
    assert not batch["attention_mask"].all()  # ragged: the reference also covers padding
    features, labels = trainer._target_batch(batch)
    loss, _ = trainer._ttt_loss(trainer.model, batch, features, labels)

    drafter = trainer.model
    ids, valid, loss_mask = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
    b, t = ids.shape
    anchors = torch.arange(t).expand(b, t)
    forced = window_targets(ids, anchors, K)[0][:, :, None]
    with torch.no_grad():
        logits = draft_windows(
            drafter, features, ids, anchors, K, attention_mask=valid, tokens=forced, return_logits=True
        ).logits[:, :, 0]
        z = sft_target(input_ids=ids, attention_mask=valid).logits.float()
    t2d = drafter.t2d
    expected, masked_out_of_vocab = 0.0, 0
    for i in range(b):
        for r in range(t):
            for j in range(K):
                p = r + 1 + j
                if p + 1 >= t or not (loss_mask[i, p + 1] and valid[i, p]):
                    continue
                if not t2d[z[i, p].argmax()]:
                    masked_out_of_vocab += 1
                    continue
                label = torch.softmax(z[i, p][t2d], -1)
                ce = -(label * torch.log_softmax(logits[i, r, j], -1)).sum()
                expected += 0.8**j * float(ce) / float(valid.sum())
    assert masked_out_of_vocab > 0
    assert math.isclose(loss.item(), expected, rel_tol=1e-4)


def test_the_first_assistant_tokens_are_supervised(tmp_path, sft_target, sft_data):
    """Step j at row r predicts x_{r+2+j}: it is supervised iff that token is an assistant token, so an answer
    of two tokens gets a loss at every step (on the two rows that predict them)."""
    prompt = torch.randint(3, 300, (1, 8), generator=torch.Generator().manual_seed(0))
    ids = sft_target.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=2, do_sample=False
    )
    batch = collate_sequences([{"input_ids": ids[0].tolist(), "loss_mask": [0] * 8 + [1, 1]}], 0)
    torch.manual_seed(0)
    drafter = build_drafter("eagle3", sft_target)  # the full vocabulary: every target argmax is proposable
    trainer = DrafterSFTTrainer(drafter, sft_target, make_args(tmp_path), train_dataset=sft_data.train)
    with torch.no_grad():
        loss, stats = trainer._ttt_loss(trainer.model, batch, *trainer._target_batch(batch))
    _, supervised, _, with_target = stats["steps"].tolist()
    assert supervised == with_target == [2.0] * K and loss > 0


def test_window_objective_matches_an_explicit_reference(tmp_path, sft_target, sft_data, tiny_tokenizer):
    """loss="window": sum over anchors of (L - E[R]) / K / real tokens, E[R] = sum_j prod_{i<=j} q_T(x*_i)
    along the target's argmax x*, the window ending at its first step without a loss; and as a weighted
    term added to soft_ce."""
    train = sft_data.train
    vocab = build_draft_vocab(
        draft_vocab_size=24, vocab_size=len(tiny_tokenizer), sequences=train["input_ids"],
        loss_masks=train["loss_mask"],
    )  # fmt: skip
    torch.manual_seed(0)
    drafter = build_drafter("eagle3", sft_target, vocab)
    args = make_args(tmp_path, loss="window", window_temperature=0.5)
    trainer = DrafterSFTTrainer(drafter, sft_target, args, train_dataset=train)
    batch = collate_sequences([train[i] for i in (0, 5)], tiny_tokenizer.pad_token_id)
    features, labels = trainer._target_batch(batch)
    with torch.no_grad():
        loss, stats = trainer._ttt_loss(trainer.model, batch, features, labels)

    ids, valid, loss_mask = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
    b, t = ids.shape
    anchors = torch.arange(t).expand(b, t)
    forced = window_targets(ids, anchors, K)[0][:, :, None]
    with torch.no_grad():
        logits = draft_windows(
            drafter, features, ids, anchors, K, attention_mask=valid, tokens=forced, return_logits=True
        ).logits[:, :, 0]
        z = sft_target(input_ids=ids, attention_mask=valid).logits.float()
    expected_loss, total_expected, windows = 0.0, 0.0, 0
    for i in range(b):
        for r in range(t):
            reach, length, expected = 1.0, 0, 0.0
            windows += bool(r + 2 < t and loss_mask[i, r + 2] and valid[i, r + 1])
            for j in range(K):
                p = r + 1 + j
                if (
                    p + 1 >= t
                    or not (loss_mask[i, p + 1] and valid[i, p])
                    or not drafter.t2d[z[i, p].argmax()]
                ):
                    break
                draft_id = drafter.target_to_draft(z[i, p].argmax())
                reach *= float(torch.softmax(logits[i, r, j] / 0.5, -1)[draft_id])
                length, expected = length + 1, expected + reach
            expected_loss += (length - expected) / K / float(valid.sum())
            total_expected += expected
    assert math.isclose(loss.item(), expected_loss, rel_tol=1e-4)
    assert stats["window"][1] == windows and math.isclose(
        stats["window"][0].item(), total_expected, rel_tol=1e-4
    )

    # An added term: soft_ce + w * window.
    plain = DrafterSFTTrainer(drafter, sft_target, make_args(tmp_path), train_dataset=train)
    mixed = DrafterSFTTrainer(
        drafter,
        sft_target,
        make_args(tmp_path, window_loss_weight=0.3, window_temperature=0.5),
        train_dataset=train,
    )
    with torch.no_grad():
        ce = plain._ttt_loss(drafter, batch, features, labels)[0]
        both = mixed._ttt_loss(drafter, batch, features, labels)[0]
    torch.testing.assert_close(both, ce + 0.3 * loss)

    # The temperature anneals linearly over the run's steps.
    annealed = DrafterSFTTrainer(
        drafter,
        sft_target,
        make_args(tmp_path, loss="window", window_temperature_end=0.1),
        train_dataset=train,
    )
    assert annealed.window_temperature() == 1.0  # before training
    annealed.state.max_steps, annealed.state.global_step = 10, 5
    assert annealed.window_temperature() == pytest.approx(0.55)


def test_offline_features_give_the_online_loss(tmp_path, sft_target, sft_data, tiny_tokenizer):
    online = make_trainer("eagle3", sft_target, sft_data, make_args(tmp_path), tiny_tokenizer)
    drafter = online.model
    provider = TargetFeatureProvider.offline(
        sft_data.regeneration.dataset,
        sft_data.regeneration.directory,
        sft_target,
        drafter.config.aux_layer_ids,
        progress=False,
    )
    offline = DrafterSFTTrainer(
        drafter, sft_target, make_args(tmp_path), train_dataset=sft_data.train, feature_provider=provider
    )
    batch = collate_sequences([sft_data.train[i] for i in range(3)], tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        expected = online._ttt_loss(drafter, batch, *online._target_batch(batch))[0]
        loss = offline._ttt_loss(drafter, batch, *offline._target_batch(batch))[0]
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------- training
def test_eagle3_warm_start_lowers_the_loss_and_raises_simulated_tau(
    tmp_path, sft_target, sft_data, tiny_tokenizer
):
    trainer = make_trainer("eagle3", sft_target, sft_data, make_args(tmp_path), tiny_tokenizer)
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    losses = train_losses(trainer)
    assert losses[-1] < losses[0]
    assert after["eval_loss"] < 0.9 * before["eval_loss"]
    assert after["eval_tau"] > before["eval_tau"] + 0.3, (before["eval_tau"], after["eval_tau"])
    assert {f"eval_alpha_{j}" for j in range(1, K + 1)} <= set(after)
    assert after["eval_tau"] <= K + 1 and after["eval_windows"] > 0
    # The tree (top-4 at each of 10 depths) contains the chain (top-1, K depths): it accepts at least as much.
    assert after["eval_tau"] <= after["eval_tree_tau_w4_k10"] <= 11
    logged = next(entry for entry in trainer.state.log_history if "loss" in entry)
    assert {f"step{j}_loss" for j in range(K)} | {f"step{j}_acc" for j in range(K)} <= set(logged)


def test_medusa_heads_and_other_objectives_train(tmp_path, sft_target, sft_data, tiny_tokenizer):
    objectives = (
        ("medusa", "soft_ce"),
        ("eagle3", "forward_kl"),
        ("eagle3", "acceptance"),
        ("eagle3", "window"),
    )
    for kind, loss in objectives:
        args = make_args(tmp_path / f"{kind}-{loss}", drafter_type=kind, loss=loss, max_steps=15)
        trainer = make_trainer(kind, sft_target, sft_data, args, tiny_tokenizer)
        trainer.train()
        losses = train_losses(trainer)
        assert losses[-1] < losses[0], (kind, loss, losses)


def test_resume_continues_the_same_run(tmp_path, sft_target, sft_data, tiny_tokenizer):
    args = dict(max_steps=6, save_steps=3, save_strategy="steps", logging_steps=1)
    full = make_trainer("eagle3", sft_target, sft_data, make_args(tmp_path / "a", **args), tiny_tokenizer)
    full.train()
    checkpoint = tmp_path / "a" / "out" / "checkpoint-3"
    assert (checkpoint / "model.safetensors").is_file() and (checkpoint / "optimizer.pt").is_file()
    assert set(load_file(checkpoint / "model.safetensors")) >= {"fc.weight", "lm_head.weight", "d2t", "t2d"}

    resumed = make_trainer("eagle3", sft_target, sft_data, make_args(tmp_path / "b", **args), tiny_tokenizer)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == full.state.global_step == 6
    for (name, a), (_, b) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        torch.testing.assert_close(a, b, msg=name)
    for a, b in zip(full.optimizer.state.values(), resumed.optimizer.state.values()):
        torch.testing.assert_close(a["exp_avg_sq"], b["exp_avg_sq"])

    # Continued SFT (the CST control) starts from a saved drafter given by path.
    continued = DrafterSFTTrainer(
        str(checkpoint), sft_target, make_args(tmp_path / "c"), train_dataset=sft_data.train
    )
    assert isinstance(continued.model, Eagle3Drafter)
    saved = load_file(checkpoint / "model.safetensors")
    torch.testing.assert_close(continued.model.fc.weight, saved["fc.weight"])


def test_resume_true_starts_fresh_then_continues(tmp_path, sft_target, sft_data, tiny_tokenizer):
    """`--resume_from_checkpoint true` is one command for a long run: from nothing it starts, after a stop it
    continues from the latest checkpoint."""
    args = dict(max_steps=4, save_steps=2, save_strategy="steps", logging_steps=1, eval_strategy="no")
    first = make_trainer("eagle3", sft_target, sft_data, make_args(tmp_path, **args), tiny_tokenizer)
    train_save_evaluate(first, "true", evaluate=False)  # no checkpoint yet; no final evaluation asked for
    assert first.state.global_step == 4 and (tmp_path / "out" / "checkpoint-4").is_dir()
    assert not (tmp_path / "out" / "eval_results.json").exists()
    longer = make_trainer(
        "eagle3", sft_target, sft_data, make_args(tmp_path, **{**args, "max_steps": 6}), tiny_tokenizer
    )
    steps, training_step = [], longer.training_step
    longer.training_step = lambda *a, **k: steps.append(1) or training_step(*a, **k)
    train_save_evaluate(longer, "true")
    assert longer.state.global_step == 6 and len(steps) == 2  # only the two new steps ran
    assert "eval_tau" in json.loads((tmp_path / "out" / "eval_results.json").read_text())


def test_lora_trains_only_the_adapters(tmp_path, sft_target, sft_data, tiny_tokenizer):
    args = make_args(tmp_path, max_steps=4, save_strategy="steps", save_steps=4)
    trainer = make_trainer(
        "eagle3", sft_target, sft_data, args, tiny_tokenizer, peft_config=LoraConfig(r=4, lora_alpha=8)
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert any(".fc." in n for n in trainable) and not any("lm_head" in n for n in trainable)
    for name, param in trainer.model.named_parameters():
        if name not in trainable:
            assert torch.equal(before[name], param), name
        elif "lora_B" in name:  # starts at zero
            assert not torch.equal(before[name], param), name
    assert (tmp_path / "out" / "checkpoint-4" / "adapter_model.safetensors").is_file()


# ----------------------------------------------------------------------------------------------- errors
def test_bad_inputs_fail_clearly(tmp_path, sft_target, sft_data, tiny_tokenizer):
    args = make_args(tmp_path)
    drafter = build_drafter("eagle3", sft_target, sft_data.draft_vocab)
    other = build_tiny_target(len(tiny_tokenizer), seed=1)
    other.config.num_hidden_layers = 6
    with pytest.raises(DrafterTargetMismatchError, match="target_num_hidden_layers"):
        DrafterSFTTrainer(drafter, other, args, train_dataset=sft_data.train)
    with pytest.raises(ValueError, match="train_dataset is empty"):
        DrafterSFTTrainer(drafter, sft_target, args, train_dataset=sft_data.train.select([]))
    with pytest.raises(ValueError, match="loss_mask"):
        DrafterSFTTrainer(drafter, sft_target, args, train_dataset=sft_data.train.remove_columns("loss_mask"))
    with pytest.raises(ValueError, match="drafter_type"):
        DrafterSFTTrainer(
            drafter, sft_target, make_args(tmp_path, drafter_type="medusa"), train_dataset=sft_data.train
        )
    medusa = build_drafter("medusa", sft_target, sft_data.draft_vocab, num_heads=2)
    with pytest.raises(ValueError, match="eval_window_size"):
        DrafterSFTTrainer(
            medusa, sft_target, make_args(tmp_path, drafter_type="medusa"), train_dataset=sft_data.train
        )
    with pytest.raises(ValueError, match="eval_tree_window_size=5 exceeds"):
        DrafterSFTTrainer(
            medusa, sft_target, make_args(tmp_path, drafter_type="medusa", eval_window_size=2, eval_tree_window_size=5),
            train_dataset=sft_data.train,
        )  # fmt: skip
    with pytest.raises(ValueError, match="loss must be one of"):
        make_args(tmp_path, loss="mse")
    for field, value in (
        ("window_loss_weight", -1.0), ("window_temperature", 0.0), ("window_temperature_end", -0.5),
        ("eval_tree_width", 0), ("eval_tree_window_size", -1),
    ):  # fmt: skip
        with pytest.raises(ValueError, match=field):
            make_args(tmp_path, **{field: value})
    with pytest.raises(ValueError, match="window_loss_weight"):
        make_args(tmp_path, loss="window", window_loss_weight=0.5)
    with pytest.raises(ValueError, match="remove_unused_columns"):
        make_args(tmp_path, remove_unused_columns=True)


def test_build_drafter_starts_from_the_target(sft_target, sft_data):
    vocab = sft_data.draft_vocab
    drafter = build_drafter("eagle3", sft_target, vocab)
    assert torch.equal(drafter.d2t, vocab.d2t) and torch.equal(drafter.t2d, vocab.t2d)
    torch.testing.assert_close(drafter.lm_head.weight, sft_target.lm_head.weight[vocab.target_ids])
    torch.testing.assert_close(drafter.embed_tokens.weight, sft_target.get_input_embeddings().weight)
    medusa = build_drafter("medusa", sft_target, None, num_heads=2)
    assert medusa.config.num_heads == 2 and medusa.config.draft_vocab_size == sft_target.config.vocab_size
    with pytest.raises(ValueError, match="unknown drafter kind"):
        build_drafter("hydra", sft_target)


# ----------------------------------------------------------------------------------------------- recipe
def load_recipe(name: str = "sft_drafter"):
    sys.path.insert(0, str(ROOT / "recipes"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


def test_recipe_yaml_parses_and_unknown_keys_fail(tmp_path):
    recipe = load_recipe()
    config = ROOT / "recipes" / "configs" / "smollm2-135m" / "sft_eagle3.yaml"
    model_args, data_config, args = recipe.parse_args(["--config", str(config), "--seed", "3"])
    assert model_args.target_name_or_path == "embedded" and args.drafter_type == "eagle3"
    assert isinstance(data_config, DataConfig) and data_config.seed == args.seed == 3
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"include: {config}\nnot_a_field: 1\n")  # its own includes resolve from its folder
    with pytest.raises(ValueError, match="not_a_field"):
        recipe.parse_args(["--config", str(bad)])


def test_recipes_run_on_a_local_target(tmp_path, tiny_target_dir):
    recipe = load_recipe()
    prompts = write_prompts(tmp_path / "prompts.jsonl", 12)
    model_args, data_config, args = recipe.parse_args(
        [
            "--target_name_or_path", tiny_target_dir,
            "--dataset_name", str(prompts),
            "--cache_dir", str(tmp_path / "cache"),
            "--max_new_tokens", "8",
            "--draft_vocab_size", "32",
            "--eval_fraction", "0.25",
            "--output_dir", str(tmp_path / "out"),
            "--max_steps", "2",
            "--window_size", "2",
            "--per_device_train_batch_size", "2",
            "--disable_tqdm", "true",
            "--dataloader_pin_memory", "false",
        ]
    )  # fmt: skip
    trainer = recipe.main(model_args, data_config, args)
    assert trainer.state.global_step == 2
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert "eval_tau" in json.loads((tmp_path / "out" / "eval_results.json").read_text())

    # PPOW from that warm start with the same data settings (cached data reused), interrupted and resumed.
    ppow_recipe = load_recipe("eagle_ppow")
    ppow_args = [
        "--target_name_or_path", tiny_target_dir, "--drafter_name_or_path", str(tmp_path / "out"),
        "--dataset_name", str(prompts), "--cache_dir", str(tmp_path / "cache"), "--max_new_tokens", "8",
        "--draft_vocab_size", "32", "--eval_fraction", "0.25", "--output_dir", str(tmp_path / "ppow"),
        "--window_size", "2", "--num_generations", "2", "--anchors_per_sequence", "2", "--gamma", "0.1",
        "--per_device_train_batch_size", "4", "--save_steps", "1", "--disable_tqdm", "true",
        "--dataloader_pin_memory", "false", "--use_cpu", "true",
    ]  # fmt: skip
    assert ppow_recipe.main([*ppow_args, "--max_steps", "1"]).state.global_step == 1
    resumed = ppow_recipe.main([*ppow_args, "--max_steps", "2", "--resume_from_checkpoint", "true"])
    saved = json.loads((tmp_path / "ppow" / "checkpoint-1" / "trainer_state.json").read_text())["log_history"]
    # Step 1 was restored from the checkpoint, not re-run (a re-run would log other timings).
    assert resumed.state.global_step == 2 and resumed.state.log_history[0] == saved[0]
    out = tmp_path / "ppow"
    for name in ("split.json", "warm_start_results.json", "eval_results.json", "model.safetensors"):
        assert (out / name).is_file(), name
    assert type(AutoModel.from_pretrained(out)).__name__ == "Eagle3Drafter"

    # The design's command on CPU cores: 2 processes of real DDP (gloo) through the shipped accelerate config,
    # one output, the data read from the cache the runs above wrote.
    launched = tmp_path / "ppow-ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "recipes/accelerate_configs/cpu_ddp.yaml"), "--main_process_port", "29533",
           str(ROOT / "recipes/eagle_ppow.py"), *ppow_args, "--max_steps", "2", "--output_dir", str(launched)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRL_EXPERIMENTAL_SILENCE": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    def first_step_epoch(run: Path) -> float:
        history = json.loads((run / "checkpoint-2" / "trainer_state.json").read_text())["log_history"]
        return next(entry["epoch"] for entry in history if "loss" in entry)

    # Two processes consume twice the sequences per step of one: the epoch advances (about) twice as fast.
    assert first_step_epoch(launched) == pytest.approx(2 * first_step_epoch(out), rel=0.35)
    assert (launched / "model.safetensors").is_file() and "regenerating" not in done.stderr


# ----------------------------------------------------------------------------------------------- integration
@pytest.mark.integration
def test_warm_start_on_the_embedded_target_improves_tau(tmp_path):
    from ppow_trl.target import load_target

    target, tokenizer = load_target("embedded")
    config = DataConfig(
        dataset_name="mt_bench",
        max_prompts=56,
        max_turns=1,
        max_prompt_length=96,  # drops the few long prompts: keeps steps short
        max_new_tokens=32,
        draft_vocab_size=2048,
        eval_fraction=0.2,
        cache_dir=str(tmp_path / "cache"),
    )
    data = build_training_data(config, target, tokenizer, progress=False)
    args = make_args(
        tmp_path, max_steps=40, learning_rate=1e-3, window_size=3, eval_window_size=5, logging_steps=10
    )
    trainer = make_trainer("eagle3", target, data, args, tokenizer)
    before = trainer.evaluate()["eval_tau"]
    trainer.train()
    after = trainer.evaluate()["eval_tau"]
    assert after > before + 0.05, (before, after)


def test_an_empty_eval_split_turns_evaluation_off(tmp_path, tiny_target_dir, caplog):
    recipe = load_recipe()
    prompts = write_prompts(tmp_path / "prompts.jsonl", 6)
    args = recipe.parse_args(
        [
            "--target_name_or_path", tiny_target_dir, "--dataset_name", str(prompts),
            "--cache_dir", str(tmp_path / "cache"), "--max_new_tokens", "6", "--draft_vocab_size", "32",
            "--eval_fraction", "0", "--output_dir", str(tmp_path / "out"), "--max_steps", "1",
            "--window_size", "2", "--per_device_train_batch_size", "2", "--eval_strategy", "steps",
            "--eval_steps", "1", "--disable_tqdm", "true", "--dataloader_pin_memory", "false",
        ]
    )  # fmt: skip
    with caplog.at_level("WARNING"):
        trainer = recipe.main(*args)
    assert trainer.state.global_step == 1 and trainer.args.eval_strategy == "no"
    assert "eval split is empty" in caplog.text and not (tmp_path / "out" / "eval_results.json").exists()
