"""PPOWTrainer on a tiny target: rollout, loss, zero-gradient groups, checkpoints, bad input, 2 ranks."""

import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModel

from ppow_trl.metrics import acceptance_length
from ppow_trl.models.common import unwrap_drafter
from ppow_trl.training.acceptance import dataset_acceptance
from ppow_trl.training.ppow import PPOWConfig, PPOWTrainer
from tests.conftest import build_tiny_target
from tests.ppow_fixtures import tiny_greedy_dataset, tiny_ppow_config
from tests.test_drafting import make_drafter


@pytest.fixture(scope="module")
def dataset(tiny_target):
    return tiny_greedy_dataset(tiny_target)


def make_trainer(tiny_target, tiny_tokenizer, dataset, tmp_path, drafter=None, **overrides):
    drafter = drafter or make_drafter("eagle3", tiny_target)
    trainer = PPOWTrainer(
        drafter, tiny_target, tiny_ppow_config(tmp_path, **overrides), dataset, tiny_tokenizer
    )
    trainer.model.train()  # rollouts log under "train" as inside Trainer.train()
    return trainer


def test_rollout_produces_consistent_windows_rewards_and_advantages(
    tiny_target, tiny_tokenizer, dataset, tmp_path
):
    trainer = make_trainer(tiny_target, tiny_tokenizer, dataset, tmp_path)
    rows = [dataset[i] for i in [0, 0, 0, 0, 1, 1, 1, 1]]  # two GRPO groups of G=4
    out = trainer._generate_and_score_completions(rows)
    assert out["window_tokens"].shape == (8, 4, 4) and out["advantages"].shape == (8, 4)
    # All copies of a sequence draft at the same anchors (the group is G windows at one anchor).
    assert torch.equal(out["anchors"][0], out["anchors"][3]) and torch.equal(
        out["anchors"][4], out["anchors"][7]
    )
    # Advantages are normalised within each group: zero mean over the G copies.
    grouped = out["advantages"].view(2, 4, 4)
    assert torch.allclose(grouped.sum(1), torch.zeros(2, 4), atol=1e-4)
    # The loss covers tokens through the first rejection only.
    assert bool((out["loss_mask"].sum(-1) >= 1).all())
    metrics = trainer._metrics["train"]
    assert {
        "tau",
        "frac_reward_zero_std",
        "rewards/cost_aware_speedup_reward/mean",
        "windows_per_second",
    } <= set(metrics)


def test_proximity_eps_from_a_quantile_of_the_first_token_misses(
    tiny_target, tiny_tokenizer, dataset, tmp_path
):
    """With proximity_eps_quantile, eps follows the batch's Delta of first-token misses: the nearest half of
    them earn the proximity reward (a fixed eps of 2 nats would reward none on an untrained drafter)."""
    trainer = make_trainer(tiny_target, tiny_tokenizer, dataset, tmp_path, proximity_eps_quantile=0.5)
    trainer._generate_and_score_completions([dataset[i] for i in [0, 0, 0, 0, 1, 1, 1, 1]])
    metrics = trainer._metrics["train"]
    eps, delta = metrics["proximity_eps_used"][-1], metrics["proximity_delta_at_k0/mean"][-1]
    assert 2.0 < eps < float("inf") and abs(eps - delta) < 3 * metrics["proximity_delta_at_k0/std"][-1]
    assert 0.0 < metrics["rewards/proximity_reward/mean"][-1] < trainer.args.proximity_eta
    with pytest.raises(ValueError, match="proximity_eps_quantile"):
        tiny_ppow_config(tmp_path, proximity_eps_quantile=1.5)


def test_group_with_equal_rewards_gives_zero_policy_gradient(tiny_target, tiny_tokenizer, dataset, tmp_path):
    trainer = make_trainer(tiny_target, tiny_tokenizer, dataset, tmp_path, target_kl_coef=0.0)
    inputs = trainer._generate_and_score_completions([dataset[0]] * 8)
    inputs["advantages"] = torch.zeros_like(inputs["advantages"])  # what equal rewards in a group give
    loss = trainer._compute_loss(trainer.model, inputs)
    loss.backward()
    grads = [p.grad for p in trainer.model.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(float(g.abs().max()) == 0.0 for g in grads)
    # Equal rewards do produce zero advantages.
    adv, std = trainer._group_advantages(torch.full((8, 4, 2), 0.7), torch.ones(8, dtype=torch.bool))
    assert float(adv.abs().max()) == 0.0 and float(std.max()) == 0.0


def test_policy_gradient_favours_the_rewarded_window(tiny_target, tiny_tokenizer, dataset, tmp_path):
    """One positive-advantage window: a step raises its log-probability."""
    trainer = make_trainer(tiny_target, tiny_tokenizer, dataset, tmp_path, target_kl_coef=0.0)
    inputs = trainer._generate_and_score_completions([dataset[0]] * 8)
    inputs["advantages"] = torch.zeros_like(inputs["advantages"])
    inputs["advantages"][0, 0] = 1.0
    inputs["loss_mask"] = torch.ones_like(inputs["loss_mask"])
    before = inputs["old_logprobs"][0, 0].sum()
    opt = torch.optim.SGD([p for p in trainer.model.parameters() if p.requires_grad], lr=1e-3)
    trainer._compute_loss(trainer.model, inputs).backward()
    opt.step()
    from ppow_trl.decoding.drafting import draft_windows

    after = draft_windows(
        trainer.model, inputs["features"], inputs["input_ids"], inputs["anchors"], 4,
        temperature=1.0, attention_mask=inputs["attention_mask"], tokens=inputs["window_tokens"][:, :, None],
    ).logprobs[0, 0, 0].sum()  # fmt: skip
    assert float(after) > float(before)


def test_greedy_acceptance_is_exact_on_data_off_the_target_greedy_path(tiny_target, tiny_tokenizer, tmp_path):
    """On random text the next token is not the target's argmax, so k must come from the target along
    the drafted path. A uniform drafter over a 2-token draft vocabulary (the target's most frequent
    argmaxes) makes accepted windows common; every k is checked against a target forward per window, and
    the proximity reward, which needs the target's greedy window, stays off."""
    from datasets import Dataset

    ids = torch.randint(3, tiny_target.config.vocab_size, (2, 30), generator=torch.Generator().manual_seed(3))
    data = Dataset.from_list(
        [{"input_ids": r.tolist(), "loss_mask": [0] * 6 + [1] * 24, "index": i} for i, r in enumerate(ids)]
    )
    with torch.no_grad():
        argmax = tiny_target(ids).logits.argmax(-1)
    vocab = torch.sort(torch.bincount(argmax.flatten()).topk(2).indices).values
    drafter = make_drafter("eagle3", tiny_target, draft_vocab_size=2)
    t2d = torch.zeros(tiny_target.config.vocab_size, dtype=torch.bool)
    t2d[vocab] = True
    drafter.set_draft_vocab(vocab - torch.arange(2), t2d)
    with torch.no_grad():
        for head in drafter.output_heads():
            head.weight.zero_()
    trainer = make_trainer(
        tiny_target,
        tiny_tokenizer,
        data,
        tmp_path,
        drafter=drafter,
        anchors_per_sequence=8,
        proximity_eps=1e9,  # any finite Delta would count as a near miss
    )
    out = trainer._generate_and_score_completions([data[0]] * 4 + [data[1]] * 4)
    tokens, anchors = out["window_tokens"], out["anchors"]
    expected = torch.zeros(anchors.shape, dtype=torch.long)
    with torch.no_grad():
        for b, a in torch.cartesian_prod(
            torch.arange(anchors.shape[0]), torch.arange(anchors.shape[1])
        ).tolist():
            path = torch.cat([out["input_ids"][b, : anchors[b, a] + 2], tokens[b, a]])
            predicted = tiny_target(path[None]).logits[0, anchors[b, a] + 1 : -1].argmax(-1)
            expected[b, a] = (predicted == tokens[b, a]).long().cumprod(0).sum()
    assert float(trainer._metrics["train"]["accepted_length/mean"][-1]) == pytest.approx(
        expected.float().mean().item()
    )
    assert int(expected.sum()) > 0  # accepted tokens occurred, so the check has teeth
    # Off the greedy path the target's greedy window is unknown: no proximity reward.
    assert trainer._metrics["train"]["rewards/proximity_reward/mean"][-1] == 0.0


def test_train_logs_checkpoints_and_resumes(tiny_target, tiny_tokenizer, dataset, tmp_path):
    trainer = make_trainer(
        tiny_target, tiny_tokenizer, dataset, tmp_path, max_steps=4, save_strategy="steps", save_steps=2,
    )  # fmt: skip
    trainer.train()
    logged = [h for h in trainer.state.log_history if "tau" in h]
    assert len(logged) == 4 and all("kl_to_target" in h and "reward" in h for h in logged)
    checkpoint = tmp_path / "checkpoint-2"
    assert (checkpoint / "model.safetensors").is_file() and (checkpoint / "optimizer.pt").is_file()
    reloaded = AutoModel.from_pretrained(checkpoint)
    assert type(reloaded).__name__ == "Eagle3Drafter"
    resumed = make_trainer(tiny_target, tiny_tokenizer, dataset, tmp_path, max_steps=4)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 4
    held_out = dataset.select(range(4))
    metrics = resumed.evaluate(held_out)
    # The trainer's held-out tau is the shared computation on its own feature provider, window and pad id.
    k, _ = dataset_acceptance(
        unwrap_drafter(resumed.model),
        resumed.feature_provider,
        held_out,
        resumed.args.window_size,
        resumed.window_pad_token_id,
    )
    assert metrics["eval_windows"] == k.numel() > 0
    assert metrics["eval_tau"] == pytest.approx(acceptance_length(k))
    assert metrics["eval_alpha_1"] == pytest.approx(float((k >= 1).float().mean()))
    # the tree tau (w=4, K=10) beside it, from the same shared computation, never below the chain at K=10
    tree, _ = dataset_acceptance(
        unwrap_drafter(resumed.model), resumed.feature_provider, held_out, 10, resumed.window_pad_token_id,
        width=4,
    )  # fmt: skip
    chain10, _ = dataset_acceptance(
        unwrap_drafter(resumed.model), resumed.feature_provider, held_out, 10, resumed.window_pad_token_id
    )
    assert metrics["eval_tree_tau_w4_k10"] == pytest.approx(acceptance_length(tree))
    assert bool((tree >= chain10).all())
    assert "eval_tau_gain_over_start" not in metrics  # the first evaluation is the reference
    with torch.no_grad():  # a changed drafter: later evaluations report the paired gain over the first
        unwrap_drafter(resumed.model).lm_head.weight.mul_(-1.0)
    later = resumed.evaluate(dataset.select(range(4)))
    gain, se = later["eval_tau_gain_over_start"], later["eval_tau_gain_over_start_se"]
    assert gain == pytest.approx(later["eval_tau"] - metrics["eval_tau"], abs=1e-6) and se >= 0


def test_ppow_trains_a_medusa_drafter(tiny_target, tiny_tokenizer, dataset, tmp_path):
    """The same trainer fine-tunes Medusa heads: windows of K = its heads, a policy-gradient step that moves
    the heads, a checkpoint that reloads as Medusa."""
    drafter = make_drafter("medusa", tiny_target)
    before = [p.detach().clone() for p in drafter.parameters() if p.requires_grad]
    trainer = make_trainer(tiny_target, tiny_tokenizer, dataset, tmp_path, drafter=drafter, max_steps=2)
    out = trainer._generate_and_score_completions([dataset[i] for i in [0, 0, 0, 0, 1, 1, 1, 1]])
    assert out["window_tokens"].shape[-1] == drafter.config.num_heads
    trainer.train()
    after = [p for p in unwrap_drafter(trainer.model).parameters() if p.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(after, before))
    logged = [h for h in trainer.state.log_history if "tau" in h]
    assert len(logged) == 2 and all("reward" in h and "kl_to_target" in h for h in logged)
    trainer.save_model(str(tmp_path / "final"))
    assert type(AutoModel.from_pretrained(tmp_path / "final")).__name__ == "MedusaDrafter"


def test_bad_input_is_refused_with_clear_errors(tiny_target, tiny_tokenizer, dataset, tmp_path):
    with pytest.raises(ValueError, match="num_generations"):
        PPOWConfig(output_dir=str(tmp_path), num_generations=1, use_cpu=True)
    with pytest.raises(ValueError, match="unknown reward"):
        tiny_ppow_config(tmp_path, reward_funcs=["nope"])
    other = build_tiny_target(tiny_target.config.vocab_size, num_layers=6)
    from ppow_trl.models import DrafterTargetMismatchError

    with pytest.raises(DrafterTargetMismatchError, match="target_num_hidden_layers"):
        make_trainer(tiny_target, tiny_tokenizer, dataset, tmp_path, drafter=make_drafter("eagle3", other))
    with pytest.raises(ValueError, match="empty"):
        make_trainer(tiny_target, tiny_tokenizer, dataset.select([]), tmp_path)
    trainer = make_trainer(tiny_target, tiny_tokenizer, dataset, tmp_path, window_size=40)
    with pytest.raises(ValueError, match="room for a window of K=40"):
        trainer._generate_and_score_completions([dataset[0]] * 8)

    def short_reward(prompts, completions, completion_ids, **kwargs):
        return [1.0]

    def nan_reward(prompts, completions, completion_ids, **kwargs):
        return [float("nan")] * len(prompts)

    for func, message in ((short_reward, "returned 1 values"), (nan_reward, "NaN")):
        trainer = PPOWTrainer(
            make_drafter("eagle3", tiny_target), tiny_target,
            tiny_ppow_config(tmp_path, reward_weights=[1.0, 1.0, 1.0]), dataset, tiny_tokenizer, reward_funcs=[func],
        )  # fmt: skip
        with pytest.raises(ValueError, match=message):
            trainer._generate_and_score_completions([dataset[0]] * 8)


def test_two_processes_keep_identical_weights_and_normalise_over_the_whole_group(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRL_EXPERIMENTAL_SILENCE": "1", "HF_HUB_OFFLINE": "1"}
    # Launched as a user would, through accelerate with the shipped CPU config (torchrun + gloo underneath).
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           "recipes/accelerate_configs/cpu_ddp.yaml", "--main_process_port", "29531",
           "tests/scripts/ppow_two_ranks.py", str(tmp_path)]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{i}.pt", weights_only=False) for i in (0, 1))
    for name, tensor in r0["state"].items():
        assert torch.equal(tensor, r1["state"][name]), name
    assert len(r0["records"]) == len(r1["records"]) == 3
    for a, b in zip(r0["records"], r1["records"]):
        # One group of G=4 copies per rollout: 2 on each rank. The advantages each rank used must be the
        # normalisation over all 4 rewards, not over its own 2.
        total = torch.cat([a["total"], b["total"]])  # (4, A)
        expected = (total - total.mean(0)) / (total.std(0) + 1e-4)
        torch.testing.assert_close(
            torch.cat([a["advantages"], b["advantages"]]), expected, atol=1e-5, rtol=1e-4
        )


def test_greedy_baseline_compares_each_window_with_the_drafter_greedy_window(
    tiny_target, tiny_tokenizer, dataset, tmp_path
):
    """baseline='greedy': A_i = R_i - R(greedy window at the anchor); 'group_and_greedy': minus the mean of the
    G windows and the greedy one. On greedy data both k follow from the sequence's own tokens."""
    from ppow_trl.decoding.drafting import draft_windows, window_targets
    from ppow_trl.training.acceptance import accepted_prefix_length
    from ppow_trl.training.rewards import speedup_value

    rows = [dataset[i] for i in [0, 0, 0, 0, 1, 1, 1, 1]]
    for baseline in ("greedy", "group_and_greedy"):
        trainer = make_trainer(
            tiny_target, tiny_tokenizer, dataset, tmp_path, baseline=baseline, scale_rewards="none",
            reward_funcs=["cost_aware_speedup"], temperature=0.5,
        )  # fmt: skip
        out = trainer._generate_and_score_completions(rows)
        reference = window_targets(out["input_ids"], out["anchors"], 4)[0]
        greedy = draft_windows(
            trainer.model, out["features"], out["input_ids"], out["anchors"], 4,
            attention_mask=out["attention_mask"],
        ).tokens[:, :, 0]  # fmt: skip
        reward = speedup_value(accepted_prefix_length(out["window_tokens"], reference), 0.12).view(2, 4, -1)
        greedy_reward = speedup_value(accepted_prefix_length(greedy, reference), 0.12).view(2, 4, -1)[:, :1]
        if baseline == "greedy":
            expected = reward - greedy_reward
        else:
            expected = reward - (reward.sum(1, keepdim=True) + greedy_reward) / 5
        torch.testing.assert_close(out["advantages"], expected.view(8, -1), atol=1e-5, rtol=1e-5)
        assert "greedy/accepted_length/mean" in trainer._metrics["train"]
    # Samples that tie with the greedy window score 0 whatever the group does.
    assert bool((out["advantages"][expected.view(8, -1) == 0] == 0).all())


def test_advantage_scaling_includes_the_greedy_window_and_batch_scale(
    tiny_target, tiny_tokenizer, dataset, tmp_path
):
    has = torch.ones(8, dtype=torch.bool)
    samples = torch.zeros(8, 2, 1)
    samples[4:, :, 0] = torch.tensor([1.0, 0.0])  # group 2 varies at anchor 0 only
    greedy = torch.zeros(8, 2, 1)
    greedy[:4] = 4.5  # group 1: four equal misses where the greedy window is accepted
    trainer = make_trainer(
        tiny_target, tiny_tokenizer, dataset, tmp_path, baseline="greedy", reward_funcs=["cost_aware_speedup"]
    )
    adv, std = trainer._group_advantages(samples, has, greedy)
    # Group scale over the G windows and the greedy one: the all-equal group still has spread, no 1e4 blow-up.
    spread = torch.tensor([0.0, 0.0, 0.0, 0.0, 4.5]).std()
    torch.testing.assert_close(adv[:4], torch.full((4, 2), -4.5 / (float(spread) + 1e-4)))
    assert float(std[0].max()) == 0.0  # the logged std is the samples' (frac_reward_zero_std)
    trainer.args.scale_rewards = "batch"
    adv, _ = trainer._group_advantages(samples, has, greedy)
    members = torch.cat([samples.view(2, 4, 2), greedy.view(2, 4, 2)[:, :1]], 1)
    torch.testing.assert_close(adv[:4], torch.full((4, 2), -4.5 / (float(members.std()) + 1e-4)))
    trainer.args.baseline = "group"
    adv, _ = trainer._group_advantages(samples, has)
    expected = (samples.view(2, 4, 2) - samples.view(2, 4, 2).mean(1, keepdim=True)) / (samples.std() + 1e-4)
    torch.testing.assert_close(adv, expected.view(8, 2))


def test_first_token_proximity_needs_no_target_forward(
    tiny_target, tiny_tokenizer, dataset, tmp_path, monkeypatch
):
    """proximity_span='first_token': Delta_1 = max_v log P(v | x) - log P(yhat_1 | x) from the teacher-forced
    target logits alone; on greedy data no target forward along the windows runs."""
    import ppow_trl.training.ppow as ppow

    def no_forward(*args, **kwargs):
        raise AssertionError("target forward along the drafted windows")

    monkeypatch.setattr(ppow, "window_logits", no_forward)
    trainer = make_trainer(
        tiny_target, tiny_tokenizer, dataset, tmp_path, proximity_span="first_token", proximity_eps=1e9
    )
    out = trainer._generate_and_score_completions([dataset[i] for i in [0, 0, 0, 0, 1, 1, 1, 1]])
    with torch.no_grad():
        logp = torch.log_softmax(tiny_target(out["input_ids"]).logits.float(), -1)
    batch = torch.arange(8)[:, None]
    first = logp[batch, out["anchors"] + 1]  # (B, A, V): the target at the window's first token
    delta = first.amax(-1) - first.gather(-1, out["window_tokens"][..., :1]).squeeze(-1)
    missed = out["loss_mask"].sum(-1) == 1  # k = 0
    metrics = trainer._metrics["train"]
    assert metrics["proximity_delta_at_k0/mean"][-1] == pytest.approx(float(delta[missed].mean()), rel=1e-4)
    # eps 1e9: every first-token miss is a near miss.
    reward = metrics["rewards/proximity_reward/mean"][-1]
    assert reward == pytest.approx(0.3 * float(missed.float().mean()), rel=1e-5)


def test_anchors_are_limited_to_winnable_ones(tiny_target, tiny_tokenizer, dataset, tmp_path):
    """The first window token's target argmax is in the draft vocabulary, and with adaw_top_w among the
    drafter's top-w step-0 candidates; without the filter, unwinnable anchors are drawn too."""
    from ppow_trl.decoding.drafting import draft_windows

    rows = [dataset[i] for i in [0, 0, 0, 0, 1, 1, 1, 1]]
    drafter = make_drafter("eagle3", tiny_target)
    in_vocab = {}
    for flag in (True, False):
        trainer = make_trainer(
            tiny_target, tiny_tokenizer, dataset, tmp_path, drafter=drafter, anchors_in_draft_vocab=flag,
            anchors_per_sequence=16,
        )  # fmt: skip
        out = trainer._generate_and_score_completions(rows)
        with torch.no_grad():
            target_argmax = tiny_target(out["input_ids"]).logits.argmax(-1)
        first = target_argmax[torch.arange(8)[:, None], out["anchors"] + 1]
        in_vocab[flag] = drafter.t2d[first]
        assert ("anchors/winnable_fraction" in trainer._metrics["train"]) == flag
    assert bool(in_vocab[True].all()) and not bool(in_vocab[False].all())
    # The untrained drafter ranks the target's token in its top 50 at some anchors of sequence 0 and at none of
    # sequence 1 (ranks 96 and 114), which keeps its unfiltered anchors.
    trainer = make_trainer(
        tiny_target, tiny_tokenizer, dataset, tmp_path, drafter=drafter, adaw_warmup_steps=0, adaw_top_w=50,
        anchors_per_sequence=16,
    )  # fmt: skip
    out = trainer._generate_and_score_completions(rows)
    with torch.no_grad():
        first = tiny_target(out["input_ids"]).logits.argmax(-1)[torch.arange(8)[:, None], out["anchors"] + 1]
        step0 = draft_windows(
            drafter, out["features"], out["input_ids"], out["anchors"], 1, attention_mask=out["attention_mask"],
            return_logits=True, tokens=out["window_tokens"][:, :, None, :1],
        ).logits[:, :, 0, 0]  # fmt: skip
    in_top = (drafter.draft_to_target(step0.topk(50, -1).indices) == first[..., None]).any(-1)
    assert bool(in_top[:4].all()) and not bool(in_top[4:].any())
    assert 0 < trainer._metrics["train"]["anchors/winnable_fraction"][-1] < 0.5


def test_sampling_acceptance_scores_the_accept_coin(tiny_target, tiny_tokenizer, dataset, tmp_path):
    """In sampling mode the old log-probabilities are the outcome's (token and coin): log min(q, p) up to k,
    log(q - p) at the rejection; the loss at the rollout policy has ratio 1. score_accept_coin=False keeps log q."""
    from ppow_trl.training.ppow import speculative_outcome_logprobs

    rows = [dataset[i] for i in [0, 0, 0, 0, 1, 1, 1, 1]]
    trainer = make_trainer(tiny_target, tiny_tokenizer, dataset, tmp_path, acceptance_mode="sampling")
    out = trainer._generate_and_score_completions(rows)
    from ppow_trl.decoding.drafting import draft_windows

    with torch.no_grad():
        log_q = draft_windows(
            trainer.model, out["features"], out["input_ids"], out["anchors"], 4, temperature=1.0,
            attention_mask=out["attention_mask"], tokens=out["window_tokens"][:, :, None],
        ).logprobs[:, :, 0]  # fmt: skip
    expected = speculative_outcome_logprobs(log_q, out["target_token_logprobs"], out["accepted"])
    torch.testing.assert_close(out["old_logprobs"], expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out["old_logprobs"], log_q)
    loss = trainer._compute_loss(trainer.model, out)
    assert torch.isfinite(loss) and trainer._metrics["train"]["clip_ratio"][-1] == 0.0
    loss.backward()
    plain = make_trainer(
        tiny_target, tiny_tokenizer, dataset, tmp_path, acceptance_mode="sampling", score_accept_coin=False
    )
    assert "accepted" not in plain._generate_and_score_completions(rows)
    # The greedy window is verified with the samples (one-hot q) in the same packed target forward.
    greedy = make_trainer(
        tiny_target, tiny_tokenizer, dataset, tmp_path, acceptance_mode="sampling", baseline="greedy"
    )
    out = greedy._generate_and_score_completions(rows)
    assert out["old_logprobs"].shape == (8, 4, 4) and torch.isfinite(out["advantages"]).all()
    assert "greedy/accepted_length/mean" in greedy._metrics["train"]


def test_a_step_sees_8_sequences_x_32_anchors_and_keeps_the_optimizer_settings(
    tiny_target, tiny_tokenizer, dataset, tmp_path
):
    """per_device_train_batch_size x gradient_accumulation_steps / num_generations distinct sequences per
    optimizer step (one rollout per step), anchors_per_sequence each; adam_beta2 and max_grad_norm pass through."""
    seen = []

    class Recording(PPOWTrainer):
        def _generate_and_score_completions(self, inputs):
            out = super()._generate_and_score_completions(inputs)
            seen.append(({int(r["index"]) for r in inputs}, tuple(out["anchors"].shape)))
            return out

    config = tiny_ppow_config(
        tmp_path, per_device_train_batch_size=8, gradient_accumulation_steps=4, anchors_per_sequence=32,
        max_steps=1, adam_beta2=0.95, max_grad_norm=0.5,
    )  # fmt: skip
    trainer = Recording(make_drafter("eagle3", tiny_target), tiny_target, config, dataset, tiny_tokenizer)
    trainer.train()
    assert seen == [(seen[0][0], (32, 32))] and len(seen[0][0]) == 8
    assert trainer.optimizer.param_groups[0]["betas"] == (0.9, 0.95) and trainer.args.max_grad_norm == 0.5


def test_new_options_are_validated_by_name(tmp_path):
    for name, value in (
        ("baseline", "mean"), ("proximity_span", "all"), ("scale_rewards", "std"), ("adaw_top_w", -1),
        ("temperature", 0.0), ("adaw_temperature", 0.0),
    ):  # fmt: skip
        with pytest.raises(ValueError, match=name):
            tiny_ppow_config(tmp_path, **{name: value})
