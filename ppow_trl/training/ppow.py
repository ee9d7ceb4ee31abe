"""PPOWTrainer: window-level policy optimisation of a drafter, as a TRL GRPOTrainer subclass.

One rollout (`_generate_and_score_completions`) on a batch of target-generated sequences:
  1. the frozen target gives the drafter's features and its logits (teacher-forced, no grad);
  2. anchors are picked per sequence among winnable ones: uniformly during `adaw_warmup_steps`, then by ADAW;
     every copy of a sequence in a GRPO group (TRL's sampler repeats each row `num_generations`
     times, possibly across processes) picks the same anchors, so a group is G windows at one anchor;
  3. the drafter samples one window of K tokens at every anchor (batched drafting);
  4. verification: greedy = common prefix with the target's own greedy continuation (exact and free
     on greedy data); sampling = lossless speculative sampling against the target's distribution
     along the drafted window (one packed target forward for all windows);
  5. rewards through TRL-style reward functions (cost-aware speedup, proximity, user functions),
     gathered across processes, minus a baseline (the group mean, or the reward of the drafter's greedy
     window at the anchor, drafted and verified as one more member) and scaled (`scale_rewards`).
`_compute_loss` re-scores the windows with grad: PPO-clipped surrogate on the drafted tokens (under sampling
acceptance, on each token's outcome including its accept coin: `speculative_outcome_logprobs`) plus
beta * KL(target || drafter) on the window positions, both on the tokens up to and including the
first rejection (later tokens cannot change k; see `loss_positions`). The method: docs/ppow.md.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import ClassVar, NamedTuple

import torch
from transformers import AutoModel, GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase
from trl import GRPOConfig, GRPOTrainer

from ppow_trl import _compat
from ppow_trl.data import TargetFeatureProvider, collate_sequences
from ppow_trl.decoding.cost import measure_gamma
from ppow_trl.decoding.drafting import draft_windows, window_targets
from ppow_trl.decoding.kernels import verify_windows
from ppow_trl.io import PPOW_PAPER
from ppow_trl.metrics import acceptance_metrics, paired_tau_difference, per_position_acceptance
from ppow_trl.models.common import lora_for_drafter, scatter_draft_probs, token_logprobs, unwrap_drafter
from ppow_trl.target import pad_token_id, window_logits
from ppow_trl.training.acceptance import (
    DEFAULT_TREE_WIDTH,
    DEFAULT_TREE_WINDOW,
    acceptance_shapes,
    accepted_prefix_length,
    dataset_acceptances,
    tree_tau_metrics,
)
from ppow_trl.training.card import DrafterCardMixin
from ppow_trl.training.rewards import get_reward_funcs
from ppow_trl.training.windowing import (
    anchor_first_tokens,
    position_scores,
    restrict_anchors,
    sample_anchors,
    valid_anchors,
    window_scores,
    winnable_anchors,
)

logger = logging.getLogger(__name__)


class Verification(NamedTuple):
    """Verified windows, one row per member.

    accepted: (N, A) k. delta: (N, A) proximity Delta (`proximity_span`), None when not computed.
    target_draft_logits: (N, A, K, V_d) the target's logits over the draft vocabulary along each window, which the
        KL term uses: the drafted path when scored, else the reference path (equal to it up to the first
        rejection on greedy data).
    token_logprobs: (N, A, K) log p of each drafted token at `verify_temperature` (sampling acceptance only).
    """

    accepted: torch.Tensor
    delta: torch.Tensor | None
    target_draft_logits: torch.Tensor
    token_logprobs: torch.Tensor | None


def speculative_outcome_logprobs(
    draft_logprobs: torch.Tensor, target_logprobs: torch.Tensor, accepted: torch.Tensor
) -> torch.Tensor:
    """(..., K) log-probability of each window position's outcome under speculative sampling, the terms whose
    gradient is the exact score function of a window's reward.

    Position j drafts x_j ~ q and accepts it with probability min(1, p/q), so the joint probability of the
    token and its coin is min(q, p) when accepted and q - p at the first rejection (only possible where
    q > p); later positions drafted no coin and keep log q. `draft_logprobs` / `target_logprobs` (..., K) are
    log q(x_j) and log p(x_j); `accepted` (...) is k. An outcome the current q makes impossible (q <= p at the
    rejection) gets a log-probability ~14 nats below log q, so its ratio is ~0 rather than NaN.
    """
    position = torch.arange(draft_logprobs.shape[-1], device=draft_logprobs.device)
    k = accepted[..., None]
    accept = torch.minimum(draft_logprobs, target_logprobs)
    # log(q - p) = log q + log(1 - p/q)
    gap = (target_logprobs - draft_logprobs).clamp(max=-1e-6)
    reject = draft_logprobs + torch.log(-torch.expm1(gap))
    return torch.where(position < k, accept, torch.where(position == k, reject, draft_logprobs))


@dataclass
class PPOWConfig(GRPOConfig):
    """Configuration of `PPOWTrainer`. GRPO fields keep their meaning: `num_generations` is G (windows
    per anchor), `temperature` is the drafter's sampling temperature, `epsilon`/`epsilon_high` the clip
    range, `reward_weights` weights `reward_funcs` (then any user reward functions, in order)."""

    window_size: int = field(
        default=10, metadata={"help": "K, tokens drafted per window (the paper uses 10)."}
    )
    anchors_per_sequence: int = field(
        default=8, metadata={"help": "Anchors (windows positions) drafted per sequence and rollout."}
    )
    gamma: str = field(
        default="auto",
        metadata={
            "help": "Drafter step cost relative to one target verification in R_speed = k / (k*gamma + 1): a "
            "number (the paper: 0.12), or 'auto' to measure it on this hardware at start-up."
        },
    )
    reward_funcs: list[str] = field(
        default_factory=lambda: ["cost_aware_speedup", "proximity"],
        metadata={
            "help": "Registered reward functions (ppow_trl.training.rewards); drop 'proximity' to disable it."
        },
    )
    proximity_eta: float = field(
        default=0.3,
        metadata={
            "help": "Proximity reward value (kept below R_speed(1) so one accepted token beats a near miss)."
        },
    )
    proximity_eps: float = field(
        default=2.0,
        metadata={
            "help": "Proximity threshold in nats on Delta = logP(target greedy window) - logP(drafted window), "
            "summed over the K tokens. Calibrate it with the logged proximity_delta_at_k0/mean and /std: for the "
            "embedded demo's drafter Delta was 38-47 +- 11 nats at K=5, so 2.0 never fires there."
        },
    )
    proximity_eps_quantile: float | None = field(
        default=None,
        metadata={
            "help": "If set (0 < q < 1), eps for each batch is this quantile of Delta over the batch's "
            "first-token misses, replacing proximity_eps: the nearest q of the misses earn the proximity reward "
            "whatever Delta's scale (it grows with K and differs per drafter and target). Logged as "
            "proximity_eps_used."
        },
    )
    proximity_span: str = field(
        default="window",
        metadata={
            "help": "Which tokens Delta compares: 'window' (all K, the paper's; needs the target along the drafted "
            "window) or 'first_token' (Delta_1 = max_v log P(v | x) - log P(yhat_1 | x), the only token a k=0 "
            "window's loss trains; free, and defined on any data). Drop 'proximity' from reward_funcs to turn "
            "the reward off."
        },
    )
    baseline: str = field(
        default="group",
        metadata={
            "help": "What a window's reward is compared with: 'group' (mean of the G windows at the anchor, GRPO), "
            "'greedy' (self-critical: the reward of the drafter's greedy window at the same anchor, drafted and "
            "verified with the rollout; the metric temperature-0 serving measures) or 'group_and_greedy' (mean of "
            "the G windows and the greedy one). The greedy window is a baseline only: it carries no loss."
        },
    )
    scale_rewards: str = field(
        default="group",
        metadata={
            "help": "Divide advantages by: 'group' the reward std of the group (the G windows, plus the greedy "
            "window when the baseline uses it), 'batch' the std over all windows of the batch, 'none' nothing."
        },
    )
    anchors_in_draft_vocab: bool = field(
        default=True,
        metadata={
            "help": "Only anchors whose first window token (the target's argmax there) is in the draft vocabulary: "
            "elsewhere no drafted window can be accepted (supervised training masks those positions too). A "
            "sequence with no such anchor keeps its unfiltered anchors."
        },
    )
    use_adaw: bool = field(
        default=True, metadata={"help": "Pick anchors by ADAW divergence scores after warm-up."}
    )
    adaw_warmup_steps: int = field(
        default=5, metadata={"help": "Optimizer steps of uniform anchor sampling before ADAW takes over."}
    )
    adaw_temperature: float = field(
        default=1.0,
        metadata={
            "help": "Softmax temperature over ADAW window scores (lower = greedier). Scores are in nats (logged as "
            "adaw/window_score/mean and /std): at 1.0 sampling concentrates on the highest-KL anchors, where the "
            "drafter rarely samples the target's token; a value near the scores' std spreads it."
        },
    )
    adaw_top_w: int = field(
        default=0,
        metadata={
            "help": "With ADAW, only anchors where the target's first token is among the drafter's top-w step-0 "
            "candidates, where G samples can find it (0 = off). A sequence with no such anchor keeps the others."
        },
    )
    target_kl_coef: float = field(
        default=0.1, metadata={"help": "beta of the KL(target || drafter) penalty on window positions."}
    )
    acceptance_mode: str = field(
        default="greedy",
        metadata={
            "help": "'greedy': accept while the draft equals the target's argmax (temperature-0 serving); "
            "'sampling': lossless speculative sampling at `verify_temperature`."
        },
    )
    verify_temperature: float = field(
        default=1.0, metadata={"help": "Target temperature for acceptance_mode='sampling'."}
    )
    score_accept_coin: bool = field(
        default=True,
        metadata={
            "help": "acceptance_mode='sampling': score each verified token by the probability of its whole outcome, "
            "draft and accept coin (log min(q, p) when accepted, log(q - p) at the rejection), the exact "
            "REINFORCE gradient of the reward; False scores the drafted token alone (log q), which is biased "
            "because the coin's probability min(1, p/q) depends on q (docs/ppow.md)."
        },
    )
    loss_positions: str = field(
        default="through_first_rejection",
        metadata={
            "help": "Window tokens that carry the policy loss: 'through_first_rejection' (tokens 1..k+1; later "
            "tokens cannot change k) or 'all' (all K)."
        },
    )
    eval_window_size: int | None = field(
        default=None,
        metadata={"help": "K for held-out teacher-forced tau in evaluation (default: window_size)."},
    )
    eval_tree_width: int = field(
        default=DEFAULT_TREE_WIDTH,
        metadata={
            "help": "Width w of the held-out teacher-forced tree tau (eval_tree_tau_w{w}_k{K}, docs/metrics.md): "
            "a depth of the window is accepted while the target's token is among the drafter's top-w there."
        },
    )
    eval_tree_window_size: int | None = field(
        default=None,
        metadata={
            "help": f"Depths K of the held-out tree tau; None = {DEFAULT_TREE_WINDOW} (a Medusa drafter: at most "
            "its heads); 0 = no tree tau."
        },
    )
    # Drafter-friendly defaults over GRPO's.
    learning_rate: float = field(
        default=5e-5, metadata={"help": "AdamW learning rate (GRPO's 1e-6 barely moves heads)."}
    )
    temperature: float = field(
        default=1.0,
        metadata={
            "help": "Drafter sampling temperature for rollouts (the paper: 1); the loss's log-probabilities and, "
            "with acceptance_mode='sampling', the drafter distribution q that verification sees use it too. With "
            "greedy acceptance a lower value (e.g. 0.5) makes the G windows compete among the drafter's top "
            "candidates, the choice greedy decoding makes; see benchmarks/RESULTS_ppow_training.md."
        },
    )
    num_generations: int | None = field(default=8, metadata={"help": "G, windows sampled per anchor (>= 2)."})
    beta: float = field(
        default=0.0,
        metadata={
            "help": "GRPO's KL to a reference policy: unused (PPOW anchors the KL to the target instead)."
        },
    )
    activation_checkpointing: bool | None = field(
        default=False, metadata={"help": "Off: the drafter is one layer and the target is frozen (no grad)."}
    )
    gradient_checkpointing: bool | None = field(
        default=None, metadata={"help": "Deprecated transformers alias of activation_checkpointing."}
    )
    bf16: bool | None = field(default=False, metadata={"help": "bf16 mixed precision (use on GPUs)."})
    logging_steps: float = field(default=1, metadata={"help": "Log every N steps."})
    save_only_model: bool = field(
        default=False, metadata={"help": "Checkpoints keep optimizer state for resume."}
    )

    # GRPO fields PPOW has no use for, grouped by why (a trailing `*` is a prefix). Setting one to a value other
    # than its default is an error, not a silent no-op; the recipes' --help hides them.
    ignored_grpo_fields: ClassVar[dict[str, tuple[str, ...]]] = {
        "PPOW drafts windows with the drafter itself: no text generation, no vLLM": (
            "use_vllm", "vllm_*", "max_completion_length", "top_p", "top_k", "min_p", "repetition_penalty",
            "generation_kwargs", "chat_template_kwargs", "cache_implementation", "mask_truncated_completions",
            "max_tool_calling_iterations", "ds3_gather_for_generation", "use_transformers_continuous_batching",
            "transformers_continuous_batching_config", "use_transformers_paged",
        ),
        "PPOW optimises its own clipped window loss, not GRPO's loss variants": (
            "loss_type", "importance_sampling_level", "delta", "off_policy_mask_threshold", "top_entropy_quantile",
            "entropy_coef", "use_adaptive_entropy", "multi_objective_aggregation", "cast_lm_head_to_fp32",
            "sapo_*", "vespo_*",
        ),
        "its KL is to the frozen target (target_kl_coef): no reference model": ("beta", "sync_ref_model"),
        "it logs windows and acceptance, not completions": (
            "log_completions", "num_completions_to_print", "log_completions_hub_repo",
        ),
    }  # fmt: skip

    @classmethod
    def ignored_because(cls, name: str) -> str | None:
        """Why PPOW ignores the GRPO field `name` (`ignored_grpo_fields`), or None when it uses it."""
        for reason, patterns in cls.ignored_grpo_fields.items():
            if any(name == p or (p.endswith("*") and name.startswith(p[:-1])) for p in patterns):
                return reason
        return None

    @classmethod
    def is_ignored_grpo_field(cls, name: str) -> bool:
        """For the recipes' parser: hide the fields PPOW ignores from --help."""
        return cls.ignored_because(name) is not None

    def _ignored_grpo_fields_set(self) -> list[str]:
        """'name=value (default d): why' for each ignored GRPO field set to a value other than its default."""
        found = []
        for f in dataclasses.fields(self):
            reason = self.ignored_because(f.name)
            if reason is None:
                continue
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if getattr(self, f.name) != default:
                found.append(f"{f.name}={getattr(self, f.name)!r} (default {default!r}): {reason}")
        return found

    def __post_init__(self) -> None:
        if self.num_generations is not None and self.num_generations < 2:
            raise ValueError(
                f"num_generations (G, windows per anchor) must be >= 2 for group-relative advantages, got "
                f"{self.num_generations}"
            )
        if self.window_size < 1:
            raise ValueError(f"window_size (K) must be >= 1, got {self.window_size}")
        if self.eval_tree_width < 1:
            raise ValueError(f"eval_tree_width must be >= 1, got {self.eval_tree_width}")
        if self.eval_tree_window_size is not None and self.eval_tree_window_size < 0:
            raise ValueError(f"eval_tree_window_size must be >= 0 or None, got {self.eval_tree_window_size}")
        if self.proximity_eps_quantile is not None and not 0.0 < self.proximity_eps_quantile < 1.0:
            raise ValueError(f"proximity_eps_quantile must be in (0, 1), got {self.proximity_eps_quantile}")
        choices = {
            "proximity_span": ("window", "first_token"),
            "baseline": ("group", "greedy", "group_and_greedy"),
            # GRPOConfig maps True / False to "group" / "none" after this check.
            "scale_rewards": ("group", "batch", "none", True, False),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.temperature <= 0:
            raise ValueError(
                f"temperature (the drafter's rollout temperature) must be > 0, got {self.temperature}: at 0 the G "
                "windows of a group are identical; baseline='greedy' compares samples with the greedy window"
            )
        if self.adaw_temperature <= 0:
            raise ValueError(f"adaw_temperature must be > 0, got {self.adaw_temperature}")
        if self.adaw_top_w < 0:
            raise ValueError(f"adaw_top_w must be >= 0 (0 = off), got {self.adaw_top_w}")
        if self.acceptance_mode not in ("greedy", "sampling"):
            raise ValueError(f"acceptance_mode must be 'greedy' or 'sampling', got {self.acceptance_mode!r}")
        if self.loss_positions not in ("through_first_rejection", "all"):
            raise ValueError(
                f"loss_positions must be 'through_first_rejection' or 'all', got {self.loss_positions!r}"
            )
        if self.gamma != "auto":
            try:
                float(self.gamma)
            except ValueError:
                raise ValueError(f"gamma must be a number or 'auto', got {self.gamma!r}") from None
        get_reward_funcs(self.reward_funcs)  # unknown names fail here, before any model loads
        ignored = self._ignored_grpo_fields_set()
        if ignored:
            raise ValueError(
                "PPOWConfig: these GRPO settings have no effect in PPOW and were set (remove them): "
                + "; ".join(ignored)
            )
        super().__post_init__()


class PPOWTrainer(DrafterCardMixin, GRPOTrainer):
    """Fine-tune a warm-started drafter with PPOW's window-level rewards (see module docstring).

    Args:
        model: a drafter (`Eagle3Drafter` / `MedusaDrafter`) or the path of a saved one.
        target: the frozen target model the drafter was built for.
        args: `PPOWConfig`.
        train_dataset / eval_dataset: target-generated sequences with `input_ids`, `loss_mask` and `index`
            columns (`ppow_trl.data.build_training_data`).
        processing_class: the target's tokenizer.
        reward_funcs: extra reward functions in TRL's form, added after `args.reward_funcs`.
        peft_config: LoRA on the drafter (`type(drafter).LORA_TARGET_MODULES`).
        feature_provider: where target features come from (default: online from `target`).
    """

    # TRL's card attributes: the drafter model card written with every save (DrafterCardMixin, instead of GRPO's
    # text-generation card) names the training after `_name` and cites `_paper`.
    _tag_names = ["trl", "ppow", "speculative-decoding"]
    _name = "PPOW"
    _paper = PPOW_PAPER
    _card_fields = (
        "window_size", "num_generations", "anchors_per_sequence", "gamma", "reward_funcs", "proximity_eta",
        "proximity_eps", "proximity_eps_quantile", "proximity_span", "baseline", "scale_rewards",
        "anchors_in_draft_vocab", "use_adaw", "adaw_temperature", "adaw_top_w", "target_kl_coef", "acceptance_mode",
        "score_accept_coin", "temperature", "epsilon", "learning_rate", "per_device_train_batch_size",
        "gradient_accumulation_steps", "adam_beta2", "max_grad_norm",
    )  # fmt: skip

    def __init__(
        self,
        model: PreTrainedModel | str,
        target: PreTrainedModel,
        args: PPOWConfig,
        train_dataset,
        processing_class: PreTrainedTokenizerBase,
        eval_dataset=None,
        reward_funcs: list | None = None,
        peft_config=None,
        feature_provider: TargetFeatureProvider | None = None,
        callbacks=None,
    ):
        drafter = AutoModel.from_pretrained(model) if isinstance(model, str) else model
        drafter.check_target(target)
        if not getattr(drafter.config, "warm_started", False):
            logger.warning(
                "\n%s\nPPOW is starting from a drafter that was never warm-started (supervised). The paper's "
                "ablation shows window-level RL from scratch ends below the supervised starting point: run "
                "recipes/sft_drafter.py first.\n%s",
                "!" * 80,
                "!" * 80,
            )
        if len(train_dataset) == 0:
            raise ValueError(
                "train_dataset is empty: regenerate data first (ppow_trl.data.build_training_data)"
            )
        if getattr(drafter, "generation_config", None) is None:  # GRPOTrainer writes the pad token into it
            drafter.generation_config = GenerationConfig()
        _compat.check_grpo_hooks(type(self))
        self.target = target
        names = list(args.reward_funcs)
        funcs = get_reward_funcs(names) + list(reward_funcs or [])
        # Names for the logged `rewards/<name>` metrics, as TRL names callables.
        self.reward_names = [getattr(f, "__name__", type(f).__name__) for f in funcs]
        self.window_tokenizer = getattr(processing_class, "tokenizer", processing_class)
        self.window_pad_token_id = pad_token_id(self.window_tokenizer)
        super().__init__(
            model=drafter,
            reward_funcs=funcs,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            peft_config=lora_for_drafter(peft_config, drafter),
            callbacks=callbacks,
        )
        self.target.to(self.accelerator.device)
        base = unwrap_drafter(self.model)
        self.feature_provider = feature_provider or TargetFeatureProvider.online(
            target, base.config.aux_layer_ids
        )
        # The target along the drafted windows: for sampling acceptance and for the whole-window proximity Delta.
        self._needs_target_path = args.acceptance_mode == "sampling" or (
            "proximity" in names and args.proximity_span == "window"
        )
        self.gamma = (
            measure_gamma(target, base, args.window_size) if args.gamma == "auto" else float(args.gamma)
        )
        logger.info("PPOW gamma = %.4f (%s)", self.gamma, "measured" if args.gamma == "auto" else "given")
        # k and dataset rows of the first evaluation, the reference of `eval_tau_gain_over_start`
        self._start_windows: tuple[torch.Tensor, torch.Tensor] | None = None

    # ------------------------------------------------------------------------------------ rollout
    def _anchor_generators(self, indices: torch.Tensor) -> list[torch.Generator]:
        """Seeded per (run seed, rollout step, sequence), identical on every process."""
        gens = []
        for index in indices.tolist():
            digest = hashlib.sha256(f"{self.args.seed}:{self.state.global_step}:{index}".encode()).digest()
            gens.append(torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1))
        return gens

    def _unique_sequences(
        self, inputs: list[dict]
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """Collate the distinct sequences of a rollout batch (GRPO repeats each G times) and return, per
        batch row, which distinct sequence it is and which copy of it (0, 1, ...)."""
        indices = [int(row["index"]) for row in inputs] if "index" in inputs[0] else list(range(len(inputs)))
        first, rows, copy, seen = {}, [], [], {}
        for i, index in enumerate(indices):
            first.setdefault(index, i)
            rows.append(list(first).index(index))
            copy.append(seen.get(index, 0))
            seen[index] = copy[-1] + 1
        distinct = [dict(inputs[i], index=index) for index, i in first.items()]
        device = self.accelerator.device
        batch = {k: v.to(device) for k, v in collate_sequences(distinct, self.window_pad_token_id).items()}
        return batch, torch.tensor(rows, device=device), torch.tensor(copy, device=device)

    @torch.no_grad()
    def _generate_and_score_completions(self, inputs: list[dict]) -> dict[str, torch.Tensor]:
        """TRL's rollout hook (module docstring, steps 1-5): the per-row inputs of `_compute_loss`."""
        start = time.perf_counter()
        args, k_len = self.args, self.args.window_size
        mode = "train" if self.model.training else "eval"
        sampling = args.acceptance_mode == "sampling"
        batch, rows, copy = self._unique_sequences(inputs)
        ids, attn = batch["input_ids"], batch["attention_mask"]
        drafter = unwrap_drafter(self.model)
        # The target and pass 0 of the drafter run once per distinct sequence, not once per group copy.
        target_features = self.feature_provider(batch)
        features = getattr(target_features, drafter.feature_name)
        seq_anchors, seq_has_anchor = self._pick_anchors(
            mode, batch, drafter, features, target_features.logits
        )
        copies = int(copy.max()) + 1
        windows = draft_windows(
            drafter, features, ids, seq_anchors, k_len, num_windows=copies,
            temperature=args.temperature, attention_mask=attn, return_logits=sampling,
        )  # fmt: skip
        member_rows, member_copy, member_tokens, draft_probs = self._verification_members(
            batch, rows, copy, windows, drafter, features, seq_anchors
        )
        n = rows.numel()
        tokens, anchors = member_tokens[member_rows, :, member_copy], seq_anchors[member_rows]
        has_anchor = seq_has_anchor[member_rows]
        verified = self._verify(
            batch, member_rows, member_copy, seq_anchors, has_anchor, member_tokens, draft_probs,
            target_features.logits, drafter,
        )  # fmt: skip
        advantages, group_std = self._score_windows(
            mode, batch["index"][member_rows], anchors, tokens, verified, has_anchor, rows
        )

        accepted, has_anchor = verified.accepted[:n], has_anchor[:n]
        loss_mask = has_anchor[:, None, None].expand(-1, anchors.shape[1], k_len)
        if args.loss_positions == "through_first_rejection":
            loss_mask = loss_mask & (torch.arange(k_len, device=ids.device) <= accepted[..., None])
        self._log_rollout(mode, accepted[has_anchor], group_std, start)
        out = {
            "input_ids": ids[rows],
            "attention_mask": attn[rows],
            "features": features[rows],
            "anchors": anchors[:n],
            "window_tokens": tokens[:n],
            "old_logprobs": windows.logprobs[rows, :, copy],
            "advantages": advantages,
            "loss_mask": loss_mask,
            "target_logprobs": torch.log_softmax(verified.target_draft_logits[:n].float(), -1),
        }
        if sampling and args.score_accept_coin:
            out["accepted"] = accepted
            out["target_token_logprobs"] = verified.token_logprobs[:n]
            out["old_logprobs"] = speculative_outcome_logprobs(
                out["old_logprobs"], out["target_token_logprobs"], accepted
            )
        return out

    def _verification_members(
        self, batch, rows, copy, windows, drafter, features, seq_anchors
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The windows to verify, as (rows, copy, tokens (D, A, M, K), draft_probs (N, A, K, V_d) or None):
        member i is copy copy[i] of distinct sequence rows[i]. Batch rows come first; with a greedy baseline
        the drafter's greedy window of each distinct sequence is one more member (copy index M - 1).
        `draft_probs` is the drafter distribution each window was drawn from (sampling acceptance only)."""
        args = self.args
        sampling = args.acceptance_mode == "sampling"
        draft_probs = (
            torch.softmax(windows.logits[rows, :, copy].float() / args.temperature, -1) if sampling else None
        )
        if args.baseline == "group":
            return rows, copy, windows.tokens, draft_probs
        ids, attn = batch["input_ids"], batch["attention_mask"]
        greedy = draft_windows(drafter, features, ids, seq_anchors, args.window_size, attention_mask=attn)
        sequences = torch.arange(ids.shape[0], device=ids.device)
        member_rows = torch.cat([rows, sequences])
        member_copy = torch.cat([copy, torch.full_like(sequences, windows.tokens.shape[2])])
        member_tokens = torch.cat([windows.tokens, greedy.tokens], dim=2)
        if sampling:  # served greedily, q is one-hot: the target accepts x with probability p(x)
            one_hot = torch.nn.functional.one_hot(greedy.draft_ids[:, :, 0], drafter.config.draft_vocab_size)
            draft_probs = torch.cat([draft_probs, one_hot.float()])
        return member_rows, member_copy, member_tokens, draft_probs

    def _score_windows(
        self, mode: str, indices, anchors, tokens, verified: Verification, has_anchor, rows
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rewards of the verified members (`indices` their dataset rows), and `_group_advantages` of the first
        n = len(rows), the batch rows; members after those are the greedy windows of the distinct sequences
        (`_verification_members`), the baseline of `baseline='greedy'` / `'group_and_greedy'`."""
        n = rows.numel()
        accepted, delta = verified.accepted, verified.delta
        # Reward statistics and the proximity eps quantile cover the rollout windows only.
        scored = has_anchor & (torch.arange(len(has_anchor), device=has_anchor.device) < n)
        if delta is not None:  # the distribution proximity_eps is compared with: first-token misses
            self._record_stats(
                mode,
                "proximity_delta_at_k0",
                delta[scored[:, None] & (accepted == 0) & torch.isfinite(delta)],
            )
        rewards = self._window_rewards(indices, anchors, tokens, accepted, delta, scored)
        uses_greedy = self.args.baseline != "group"
        # Subclasses may override the two-argument form used with the group baseline.
        baseline_rewards = (rewards[n:][rows],) if uses_greedy else ()
        advantages, group_std = self._group_advantages(rewards[:n], has_anchor[:n], *baseline_rewards)
        if uses_greedy:
            self._record_stats(mode, "greedy/accepted_length", accepted[n:][has_anchor[n:]].float())
        return advantages, group_std

    def _pick_anchors(
        self,
        mode: str,
        batch: dict,
        drafter: PreTrainedModel,
        features: torch.Tensor,
        target_logits: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(anchors (B, A), has_anchor (B,)) per distinct sequence: uniform during the ADAW warm-up, then
        sampled by ADAW window scores, over winnable anchors (`anchors_in_draft_vocab`, `adaw_top_w`); every
        copy of a sequence gets the same anchors."""
        args, k_len = self.args, self.args.window_size
        ids, attn = batch["input_ids"], batch["attention_mask"]
        valid = valid_anchors(batch["loss_mask"], attn, k_len)
        use_adaw = args.use_adaw and self.state.global_step >= args.adaw_warmup_steps
        top_w = args.adaw_top_w if use_adaw else 0
        scores = step0 = None
        if use_adaw:
            all_rows = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
            step0 = draft_windows(
                drafter, features, ids, all_rows, 1, attention_mask=attn, return_logits=True,
                tokens=window_targets(ids, all_rows, 1)[0][:, :, None],
            ).logits[:, :, 0, 0]  # fmt: skip
            per_row = position_scores(
                target_logits, torch.log_softmax(step0.float(), -1), drafter.target_ids_of_draft_vocab()
            )
            scores = window_scores(per_row, k_len)
            self._record_stats(mode, "adaw/window_score", scores[valid])
        if args.anchors_in_draft_vocab or top_w:
            winnable = winnable_anchors(anchor_first_tokens(target_logits), drafter.t2d, step0, top_w)
            self._record(
                mode, "anchors/winnable_fraction", (valid & winnable).sum() / valid.sum().clamp(min=1)
            )
            valid = restrict_anchors(valid, winnable)
        generators = self._anchor_generators(batch["index"])
        anchors, has_anchor = sample_anchors(
            valid, args.anchors_per_sequence, generators, scores, args.adaw_temperature
        )
        if not has_anchor.any():
            raise ValueError(
                f"No sequence in this batch has room for a window of K={k_len} assistant tokens: lower window_size "
                "or regenerate longer responses (max_new_tokens)."
            )
        return anchors, has_anchor

    def _verify(
        self, batch, rows, copy, seq_anchors, has_anchor, seq_tokens, draft_probs, target_logits, drafter
    ) -> Verification:
        """Verify windows `seq_tokens` (D, A, M, K) of the distinct sequences: row i of the result is member
        copy[i] of sequence rows[i]. `draft_probs` (N, A, K, V_d) is the drafter distribution each window was
        drawn from (sampling acceptance only)."""
        args, k_len = self.args, self.args.window_size
        ids, attn = batch["input_ids"], batch["attention_mask"]
        tokens, anchors = seq_tokens[rows, :, copy], seq_anchors[rows]
        # The target along each distinct sequence's reference windows (D, A, K, V), shared by its members: copying
        # it per member (G + 1 of them) cost most of a rollout's memory traffic.
        reference_seq = window_targets(ids, seq_anchors, k_len)[0]
        positions = (seq_anchors[..., None] + 1 + torch.arange(k_len, device=ids.device)).clamp(
            max=ids.shape[1] - 1
        )
        on_reference = target_logits[torch.arange(ids.shape[0], device=ids.device)[:, None, None], positions]
        reference = reference_seq[rows]
        # Greedy acceptance is free when the sequence is the target's greedy path over the window (regenerated
        # greedy data); otherwise (corpus text, sampled answers) it needs the target along the drafted path.
        on_greedy_path = (on_reference.argmax(-1) == reference_seq).all(-1)[rows]  # (N, A)
        local_free = torch.tensor(
            [args.acceptance_mode == "greedy" and bool(on_greedy_path[has_anchor].all())]
        )
        # Agreed across processes: every process must take the same branch (the stats below are collective).
        free_greedy = bool(self.accelerator.gather(local_free.to(ids.device)).all())
        path_logits = drafted_logprobs = None
        if self._needs_target_path or not free_greedy:
            # One packed target forward per distinct sequence scores the windows of all its members.
            members = seq_tokens.shape[2]
            per_sequence = window_logits(
                self.target,
                ids,
                attn,
                seq_anchors.repeat_interleave(members, dim=1),
                seq_tokens.flatten(1, 2),
            )
            path_logits = per_sequence.view(*seq_tokens.shape[:3], k_len + 1, -1)[rows, :, copy]
        if free_greedy:
            accepted = accepted_prefix_length(tokens, reference)
        elif args.acceptance_mode == "greedy":
            accepted = accepted_prefix_length(tokens, path_logits[:, :, :k_len].argmax(-1))
        else:
            q = scatter_draft_probs(draft_probs, drafter.d2t, drafter.config.vocab_size)
            result = verify_windows(
                path_logits.flatten(0, 1),
                tokens.flatten(0, 1),
                q.flatten(0, 1),
                temperature=args.verify_temperature,
            )
            accepted = result.accepted.view_as(anchors)
            drafted_logprobs = token_logprobs(path_logits[:, :, :k_len], tokens, args.verify_temperature)
        if args.proximity_span == "first_token":
            # The first token's context is the prefix for every window: its greedy token is the argmax there, and
            # a gap of log-probabilities at one position is the gap of its logits.
            first = on_reference[:, :, 0].float()  # (D, A, V)
            window = torch.arange(anchors.shape[1], device=ids.device)
            delta = first.amax(-1)[rows] - first[rows[:, None], window, tokens[..., 0]]
        elif path_logits is not None:
            drafted_lp = token_logprobs(path_logits[:, :, :k_len], tokens, 1.0).sum(-1)
            greedy_lp = token_logprobs(on_reference, reference_seq, 1.0).sum(-1)[rows]
            # Delta needs the target's greedy window y: the reference is y only where it is the target's greedy
            # path; other windows (corpus text, sampled answers) get no proximity reward (Delta = inf).
            delta = (greedy_lp - drafted_lp).masked_fill(~on_greedy_path, math.inf)
        else:
            delta = None
        vocab = drafter.target_ids_of_draft_vocab()
        on_path = on_reference[..., vocab][rows] if path_logits is None else path_logits[:, :, :k_len, vocab]
        return Verification(accepted, delta, on_path, drafted_logprobs)

    def _log_rollout(self, mode: str, accepted: torch.Tensor, group_std: torch.Tensor, start: float) -> None:
        """Acceptance of the rollout's windows (k of windows at real anchors) and its throughput."""
        self._record(mode, "accepted_length/mean", accepted.float().mean())
        self._record(mode, "tau", (accepted + 1).float().mean())
        for j, a in enumerate(per_position_acceptance(accepted, self.args.window_size).tolist()):
            self._record(mode, f"alpha/{j + 1}", torch.tensor(a))
        self._record(mode, "frac_reward_zero_std", (group_std < 1e-6).float().mean())
        self._record(
            mode, "windows_per_second", torch.tensor(accepted.numel() / (time.perf_counter() - start))
        )

    def _proximity_eps(self, mode: str, accepted, delta, scored) -> float:
        """proximity_eps, or with proximity_eps_quantile that quantile of Delta over this batch's first-token
        misses (of `scored` rows) where Delta is defined."""
        quantile = self.args.proximity_eps_quantile
        if quantile is None or delta is None:
            return self.args.proximity_eps
        misses = delta[scored[:, None] & (accepted == 0) & torch.isfinite(delta)]
        if misses.numel() == 0:
            return self.args.proximity_eps
        eps = float(torch.quantile(misses.float(), quantile))
        self._record(mode, "proximity_eps_used", torch.tensor(eps))
        return eps

    def _window_rewards(self, indices, anchors, tokens, accepted, delta, scored) -> torch.Tensor:
        """(N, A, n_funcs) rewards from every reward function, called once on all windows of the batch; the
        logged reward statistics and the proximity eps quantile cover the `scored` (N,) rows only."""
        mode = "train" if self.model.training else "eval"
        b, a = anchors.shape
        window_ids = [f"{i}:{r}" for i, row in zip(indices.tolist(), anchors.tolist()) for r in row]
        flat_tokens = tokens.flatten(0, 1)
        kwargs = dict(
            accepted_lengths=accepted.flatten().tolist(),
            window_size=self.args.window_size,
            gamma=self.gamma,
            proximity_delta=None if delta is None else delta.flatten().tolist(),
            proximity_eta=self.args.proximity_eta,
            proximity_eps=self._proximity_eps(mode, accepted, delta, scored),
        )
        completions = self.window_tokenizer.batch_decode(flat_tokens)
        columns = []
        for name, func in zip(self.reward_names, self.reward_funcs):
            values = func(
                prompts=window_ids, completions=completions, completion_ids=flat_tokens.tolist(), **kwargs
            )
            if len(values) != b * a:
                raise ValueError(
                    f"reward function {name!r} returned {len(values)} values for {b * a} windows at step "
                    f"{self.state.global_step}"
                )
            column = torch.tensor([math.nan if v is None else float(v) for v in values], device=tokens.device)
            if torch.isnan(column).any() or torch.isinf(column).any():
                raise ValueError(
                    f"reward function {name!r} returned NaN/inf at step {self.state.global_step}: check its inputs"
                )
            columns.append(column.view(b, a))
            self._record_stats(mode, f"rewards/{name}", column.view(b, a)[scored])
        return torch.stack(columns, -1)

    def _group_advantages(
        self, rewards: torch.Tensor, has_anchor: torch.Tensor, greedy_rewards: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Weighted reward per window, gathered from all processes, minus the baseline (`baseline`: the group
        mean, or the reward of the greedy window at the anchor `greedy_rewards` (B, A, n_funcs), each batch
        row carrying its sequence's), scaled by `scale_rewards`; returns this process's (B, A) advantages and
        the (groups, A) reward std of the sampled windows."""
        b = rewards.shape[0]
        weights = self.reward_weights.to(rewards.device)
        total = (rewards * weights).sum(-1)
        all_total = self.accelerator.gather(total)  # (B_global, A)
        grouped = all_total.view(-1, self.num_generations, total.shape[1])
        mean, std = grouped.mean(1, keepdim=True), grouped.std(1, keepdim=True)
        members, baseline = grouped, mean
        if greedy_rewards is not None:
            # Every copy carries the same greedy window; averaging the copies averages the verification draws
            # that processes made for it under sampling acceptance (identical under greedy acceptance).
            greedy = self.accelerator.gather((greedy_rewards * weights).sum(-1)).view_as(grouped)
            greedy = greedy.mean(1, keepdim=True)
            members = torch.cat([grouped, greedy], 1)
            baseline = greedy if self.args.baseline == "greedy" else members.mean(1, keepdim=True)
        advantages = grouped - baseline
        # The scale includes the greedy window: a group of equal samples that differ from it has spread.
        if self.args.scale_rewards == "group":
            advantages = advantages / (members.std(1, keepdim=True) + 1e-4)
        elif self.args.scale_rewards == "batch":
            real = self.accelerator.gather(has_anchor).view(-1, self.num_generations)[:, 0]
            advantages = advantages / (members[real].std() + 1e-4)
        start = self.accelerator.process_index * b
        local = advantages.view_as(all_total)[start : start + b]
        mode = "train" if self.model.training else "eval"
        self._record(mode, "reward", all_total.mean())
        self._record(mode, "reward_std", std.mean())
        return local * has_anchor[:, None], std.squeeze(1)

    # ------------------------------------------------------------------------------------ loss
    def _compute_loss(self, model, inputs):
        args = self.args
        mode = "train" if self.model.training else "eval"
        tokens = inputs["window_tokens"]
        windows = draft_windows(
            model, inputs["features"], inputs["input_ids"], inputs["anchors"], args.window_size,
            temperature=args.temperature, attention_mask=inputs["attention_mask"], tokens=tokens[:, :, None],
            return_logits=args.target_kl_coef > 0,
        )  # fmt: skip
        logprobs = windows.logprobs[:, :, 0]
        if "target_token_logprobs" in inputs:  # sampling acceptance: the token and its accept coin
            logprobs = speculative_outcome_logprobs(
                logprobs, inputs["target_token_logprobs"], inputs["accepted"]
            )
        mask = inputs["loss_mask"].float()
        ratio = torch.exp(logprobs - inputs["old_logprobs"])
        adv = inputs["advantages"][..., None]
        epsilon_high = (
            args.epsilon if args.epsilon_high is None else args.epsilon_high
        )  # as GRPOTrainer reads it
        clipped = ratio.clamp(1 - args.epsilon, 1 + epsilon_high)
        per_token = -torch.min(ratio * adv, clipped * adv)
        if args.target_kl_coef > 0:
            p_log = inputs["target_logprobs"]
            q_log = torch.log_softmax(windows.logits[:, :, 0].float(), -1)
            kl = (p_log.exp() * (p_log - q_log)).sum(-1)
            per_token = per_token + args.target_kl_coef * kl
            self._record(mode, "kl_to_target", (kl * mask).sum() / mask.sum().clamp(min=1))
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"PPOW loss is {loss.item()} at step {self.state.global_step}")
        self._record(
            mode, "clip_ratio", (((ratio - clipped).abs() > 0).float() * mask).sum() / mask.sum().clamp(min=1)
        )
        steps = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        normalizer = steps if mode == "train" else 1.0
        return loss / normalizer

    # ------------------------------------------------------------------------------------ metrics
    def _record(self, mode: str, name: str, value: torch.Tensor) -> None:
        _compat.grpo_metrics(self)[mode][name].append(
            self.accelerator.gather(value.detach().float().reshape(1)).mean().item()
        )

    def _record_stats(self, mode: str, name: str, values: torch.Tensor) -> None:
        """Mean and std over all processes; gathers (count, sum, sum of squares), as counts may differ."""
        values = values.detach().double().reshape(-1)
        moments = torch.stack([values.new_tensor(values.numel()), values.sum(), values.square().sum()])
        count, total, squares = self.accelerator.gather(moments).view(-1, 3).sum(0).tolist()
        if count:
            mean = total / count
            var = max(squares - count * mean * mean, 0.0) / max(count - 1, 1)
            metrics = _compat.grpo_metrics(self)[mode]
            metrics[f"{name}/mean"].append(mean)
            metrics[f"{name}/std"].append(math.sqrt(var))

    def evaluate(
        self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"
    ) -> dict[str, float]:
        """Held-out tau and alpha_j (docs/metrics.md) at `eval_window_size`, and the tree tau, through
        `dataset_acceptances`."""
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("evaluate() needs an eval_dataset")
        was_training = self.model.training
        self.model.eval()  # GRPOTrainer.log files metrics under "eval" by this flag
        try:
            drafter = unwrap_drafter(self.model)
            window_size = self.args.eval_window_size or self.args.window_size
            shapes = acceptance_shapes(
                drafter, window_size, self.args.eval_tree_width, self.args.eval_tree_window_size
            )
            k, rows = dataset_acceptances(
                drafter,
                self.feature_provider,
                dataset,
                shapes,
                self.window_pad_token_id,
                batch_size=self.args.per_device_eval_batch_size,
                device=self.accelerator.device,
            )
            accepted = k[:, 0]
            metrics = acceptance_metrics(accepted, window_size)
            for column, (width, tree_window) in enumerate(shapes[1:], start=1):
                metrics.update(tree_tau_metrics(k[:, column], width, tree_window))
            # The first evaluation (the recipe scores the starting drafter before training) is the reference
            # later ones are compared with window by window: a paired difference is far less noisy than tau.
            if self._start_windows is None:
                self._start_windows = (accepted, rows)
            elif torch.equal(self._start_windows[1], rows):
                gain, se = paired_tau_difference(accepted, self._start_windows[0], rows)
                metrics.update(tau_gain_over_start=gain, tau_gain_over_start_se=se)
            metrics = {f"{metric_key_prefix}_{k}": v for k, v in metrics.items()}
            self.log(dict(metrics))
        finally:
            self.model.train(was_training)
        return metrics
