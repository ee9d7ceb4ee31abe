"""Supervised warm start of a drafter against a frozen target: `DrafterSFTConfig` + `DrafterSFTTrainer`.

One training step (docs/eagle3.md, training-time test):

1. frozen target features for the batch (no grad; online from the target or from an offline cache);
2. target labels from the target's last hidden state through its LM head, in vocabulary chunks: logits at
   the draft vocabulary's ids, full-vocabulary logsumexp and argmax (`ppow_trl.training.losses.target_labels`);
3. the K-step training-time-test unroll at every row at once: `draft_windows` with the sequence's own
   tokens forced (Medusa: its K heads). Step j at row r predicts x_{r+2+j}; its label is the target
   distribution at position r+1+j, renormalised over the draft vocabulary;
4. loss = sum_j decay^j * l_j, with l_j = sum over rows of mask * loss_row / D. The mask is
   loss_mask[r+2+j] (the predicted token is an assistant token) * [full-vocab target argmax at r+1+j lies
   in the draft vocabulary] * [position r+1+j is a real token]. D is the number of real (non-padding)
   positions of the micro-batch, the same for every step: EAGLE-3 divides by B*T with micro-batch 1 and no
   padding, which is this count;
5. optionally the window objective (`loss="window"`, or added with `window_loss_weight`): at every anchor,
   E[R] = sum_j prod_{i<=j} q_T(x*_i) over the forced window, x*_i the target's argmax at r+i and q_T the
   drafter at temperature T (`window_temperature`, annealed to `window_temperature_end`); the loss adds
   sum over anchors of (L - E[R]) / K / D (`ppow_trl.training.losses.window_loss`).

Evaluation adds held-out tau (docs/metrics.md: teacher-forced greedy acceptance at `eval_window_size` on the
eval set, `ppow_trl.training.acceptance.batch_acceptances`): `eval_tau` and `eval_alpha_j`, and the tree tau
`eval_tree_tau_w{w}_k{K}` (top-w draft tokens at every depth, `eval_tree_width` and `eval_tree_window_size`).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainerCallback, TrainingArguments

from ppow_trl.data import TargetFeatureProvider, collate_sequences
from ppow_trl.decoding.drafting import draft_windows, window_targets
from ppow_trl.metrics import acceptance_metrics
from ppow_trl.models import DRAFTER_CLASSES, unwrap_drafter
from ppow_trl.models.common import lora_for_drafter, token_logprobs
from ppow_trl.target import pad_token_id
from ppow_trl.training.acceptance import (
    DEFAULT_TREE_WIDTH,
    DEFAULT_TREE_WINDOW,
    acceptance_shapes,
    batch_acceptances,
    tree_tau_metrics,
)
from ppow_trl.training.card import DrafterCardMixin
from ppow_trl.training.losses import (
    LOSSES,
    ROW_LOSSES,
    TargetLabels,
    drafter_loss,
    eagle3_position_mask,
    step_weights,
    target_labels,
    window_loss,
)

logger = logging.getLogger(__name__)


@dataclass
class DrafterSFTConfig(TrainingArguments):
    """Training arguments of the supervised drafter warm start (defaults follow EAGLE-3 / SpecForge)."""

    drafter_type: str = field(
        default="eagle3", metadata={"help": "Drafter architecture: 'eagle3' or 'medusa'."}
    )
    window_size: int = field(
        default=7,
        metadata={
            "help": "K, the draft tokens per window trained: the training-time-test unroll length of an EAGLE-3 "
            "drafter. A Medusa drafter always trains all its heads (K = its number of heads)."
        },
    )
    step_weight_decay: float = field(
        default=0.8, metadata={"help": "Weight decay**j of TTT step (or Medusa head) j in the loss."}
    )
    loss: str = field(
        default="soft_ce",
        metadata={
            "help": "Objective: per row 'soft_ce' (cross-entropy to the target distribution on the draft "
            "vocabulary, EAGLE-3), 'forward_kl' (KL(p||q), same gradient) or 'acceptance' (maximise "
            "sum min(p, q) with the target's true probabilities); or 'window' (maximise the expected accepted "
            "length E[R] = sum_j prod_{i<=j} q_T(x*_i) of the forced window at every anchor, x* the target's "
            "greedy tokens, q_T the drafter at window_temperature)."
        },
    )
    window_loss_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of the window objective (see loss: 'window') added to a per-row loss; 0 = off. "
            "Leave it at 0 with loss: window, which is the window objective alone."
        },
    )
    window_temperature: float = field(
        default=1.0,
        metadata={
            "help": "Drafter temperature T > 0 of q_T in the window objective at the start of training (lower: "
            "closer to greedy drafting, where only the drafter's argmax counts)."
        },
    )
    window_temperature_end: float | None = field(
        default=None,
        metadata={
            "help": "T of the window objective at the end of training, annealed linearly from "
            "window_temperature over the run's steps; None = constant window_temperature."
        },
    )
    eval_window_size: int = field(
        default=5, metadata={"help": "Window size K of the teacher-forced acceptance (tau, alpha_j) at eval."}
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
    medusa_num_heads: int = field(
        default=4, metadata={"help": "Number of heads when a recipe builds a new Medusa drafter."}
    )
    label_chunk_size: int = field(
        default=8192,
        metadata={"help": "Vocabulary rows per chunk when the target's LM head computes the labels."},
    )
    learning_rate: float = field(
        default=1e-4, metadata={"help": "Peak AdamW learning rate (SpecForge: 1e-4)."}
    )
    adam_beta2: float = field(default=0.95, metadata={"help": "AdamW beta2 (EAGLE-3: 0.95)."})
    max_grad_norm: float = field(default=0.5, metadata={"help": "Gradient clipping norm (EAGLE-3: 0.5)."})
    logging_steps: float = field(
        default=10, metadata={"help": "Log every N steps (a float < 1 is a fraction of the run)."}
    )
    remove_unused_columns: bool = field(
        default=False,
        metadata={"help": "Must stay False: the collator needs the `loss_mask` (and `index`) columns."},
    )

    def __post_init__(self) -> None:
        if self.drafter_type not in DRAFTER_CLASSES:
            raise ValueError(
                f"drafter_type must be one of {sorted(DRAFTER_CLASSES)}, got {self.drafter_type!r}"
            )
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        for name in (
            "window_size",
            "eval_window_size",
            "eval_tree_width",
            "medusa_num_heads",
            "label_chunk_size",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.eval_tree_window_size is not None and self.eval_tree_window_size < 0:
            raise ValueError(f"eval_tree_window_size must be >= 0 or None, got {self.eval_tree_window_size}")
        if self.window_loss_weight < 0:
            raise ValueError(f"window_loss_weight must be >= 0, got {self.window_loss_weight}")
        if self.loss == "window" and self.window_loss_weight:
            raise ValueError(
                "window_loss_weight adds the window objective to a per-row loss; with loss='window' set it to 0"
            )
        for name in ("window_temperature", "window_temperature_end"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        if not 0 < self.step_weight_decay <= 1:
            raise ValueError(f"step_weight_decay must be in (0, 1], got {self.step_weight_decay}")
        if self.remove_unused_columns:
            raise ValueError("remove_unused_columns=True would drop the loss_mask column; set it to False")
        super().__post_init__()
        if self.activation_checkpointing:
            raise ValueError("activation (gradient) checkpointing is not supported by the drafter unroll")


def _check_dataset(dataset: Any, name: str) -> None:
    datasets = dataset.values() if isinstance(dataset, dict) else [] if dataset is None else [dataset]
    for data in datasets:
        if not hasattr(data, "__len__"):  # an iterable dataset: checked batch by batch
            continue
        if len(data) == 0:
            raise ValueError(f"{name} is empty: it needs regenerated sequences (input_ids + loss_mask)")
        missing = {"input_ids", "loss_mask"} - set(getattr(data, "column_names", None) or data[0])
        if missing:
            raise ValueError(f"{name} lacks column(s) {sorted(missing)}; build it with ppow_trl.data")


class DrafterSFTTrainer(DrafterCardMixin, Trainer):
    """Trains a drafter to imitate a frozen target's next-token distribution (EAGLE-3 TTT / Medusa heads).

    Args:
        model: a drafter (`Eagle3Drafter` / `MedusaDrafter`, e.g. from `build_drafter`) or the path of a
            saved one (continued SFT).
        target: the frozen target. It is moved to `args.device` here, kept in eval mode without gradients,
            and never prepared by accelerate nor seen by the optimizer.
        train_dataset / eval_dataset: regenerated sequences with `input_ids` and `loss_mask` columns.
        feature_provider: callable batch -> `TargetFeatures` (needs `last_hidden_state` and the drafter's
            feature; its `logits` are not used, the labels come from `last_hidden_state` and the target's
            LM head); default: online from the target at the drafter's aux layers.
        data_collator: default `collate_sequences` padded with the tokenizer's pad id (or 0).
        peft_config: a peft config to train LoRA adapters only; empty `target_modules` default to the
            drafter's `LORA_TARGET_MODULES`.
    """

    _tag_names = ["trl", "ppow-trl", "drafter-sft"]
    # The drafter model card written with every save (DrafterCardMixin) names the training after `_name`
    # ("supervised warm start", the mixin's).
    _card_fields = (
        "drafter_type", "window_size", "loss", "step_weight_decay", "learning_rate", "max_steps",
        "per_device_train_batch_size",
    )  # fmt: skip
    _card_window_field = "eval_window_size"

    def __init__(
        self,
        model: PreTrainedModel | nn.Module | str,
        target: PreTrainedModel,
        args: DrafterSFTConfig | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        feature_provider: TargetFeatureProvider | None = None,
        data_collator: Any = None,
        processing_class: PreTrainedTokenizerBase | None = None,
        peft_config: Any = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple[Any, Any] = (None, None),
    ):
        args = args or DrafterSFTConfig(output_dir="drafter-sft")
        if isinstance(model, str):
            model = DRAFTER_CLASSES[args.drafter_type].from_pretrained(model)
        drafter = unwrap_drafter(model)
        if not isinstance(drafter, DRAFTER_CLASSES[args.drafter_type]):
            raise ValueError(
                f"args.drafter_type={args.drafter_type!r} but the model is a {type(drafter).__name__}"
            )
        drafter.check_target(target)
        _check_dataset(train_dataset, "train_dataset")
        _check_dataset(eval_dataset, "eval_dataset")
        # A drafter with a fixed longest window (Medusa: its heads) trains all of it.
        self.num_steps = drafter.max_draft_tokens or args.window_size
        # (width, K) of the held-out acceptances: the chain tau, then the tree tau if on.
        self.acceptance_shapes = acceptance_shapes(
            drafter, args.eval_window_size, args.eval_tree_width, args.eval_tree_window_size
        )
        # Every checkpoint this trainer writes is a supervised warm start (PPOW checks this flag).
        drafter.config.warm_started = True
        if peft_config is not None:
            from peft import get_peft_model

            model = get_peft_model(model, lora_for_drafter(peft_config, drafter))

        self.target = target.eval().requires_grad_(False)
        if getattr(target, "hf_quantizer", None) is None:
            self.target.to(args.device)
        if feature_provider is None:
            aux = drafter.config.aux_layer_ids or None
            feature_provider = TargetFeatureProvider.online(self.target, aux, with_logits=False)
        provider_aux = getattr(feature_provider, "aux_layer_ids", None)
        reads_aux = bool(drafter.config.aux_layer_ids)
        if reads_aux and provider_aux is not None and list(provider_aux) != drafter.config.aux_layer_ids:
            raise ValueError(
                f"feature_provider captures aux layers {list(provider_aux)}, the drafter reads "
                f"{drafter.config.aux_layer_ids}"
            )
        self.feature_provider = feature_provider
        if data_collator is None:
            pad = pad_token_id(processing_class) if processing_class is not None else 0
            data_collator = partial(collate_sequences, pad_token_id=pad)
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            optimizers=optimizers,
        )
        # Since the last log, per TTT step: [loss sum, supervised rows, correct top-1, rows with a target];
        # of the window objective: [sum of E[R], windows].
        self._stats = {
            mode: {
                "steps": torch.zeros(4, self.num_steps, device=args.device),
                "window": torch.zeros(2, device=args.device),
            }
            for mode in ("train", "eval")
        }
        self._accepted: list[torch.Tensor] = []

    # ------------------------------------------------------------------------------------------ loss
    def autocast_smart_context_manager(self, cache_enabled: bool | None = True):
        """The drafter runs through its building blocks rather than `forward`, so accelerate's forward-level
        autocast would not apply: enter accelerate's autocast around the whole loss instead."""
        return self.accelerator.autocast()

    @torch.no_grad()
    def _target_batch(self, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, TargetLabels]:
        """The drafter's input feature and the target labels of a batch (frozen target, no grad)."""
        drafter = unwrap_drafter(self.model)
        features = self.feature_provider(inputs)
        labels = target_labels(
            features.last_hidden_state,
            self.target.get_output_embeddings(),
            drafter.target_ids_of_draft_vocab(),
            self.args.label_chunk_size,
        )
        device = self.args.device
        labels = TargetLabels(*(t.to(device) for t in dataclasses.astuple(labels)))
        return getattr(features, drafter.feature_name).to(device), labels

    def _ttt_loss(
        self, model: nn.Module, inputs: dict[str, torch.Tensor], features: torch.Tensor, labels: TargetLabels
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss of the K-step unroll at every row, and statistics for logging: "steps" (4, K) and "window"
        (2,), as in `_stats`."""
        drafter = unwrap_drafter(model)
        input_ids = inputs["input_ids"]
        valid, loss_mask = inputs["attention_mask"].bool(), inputs["loss_mask"].bool()
        b, t = input_ids.shape
        k = self.num_steps
        anchors = torch.arange(t, device=input_ids.device).expand(b, t)
        forced = window_targets(input_ids, anchors, k)[0][:, :, None]
        logits = draft_windows(
            model, features, input_ids, anchors, k, attention_mask=valid, tokens=forced, return_logits=True
        ).logits[:, :, 0]  # (B, T, K, V_d): step j at row r predicts x_{r+2+j}
        # ... from the target's output at position r+1+j (window_targets reads r+2+j: anchors one row back).
        label_argmax = window_targets(labels.argmax, anchors - 1, k)[0]
        # A step is supervised iff the token it predicts is an assistant token and its label position is real.
        supervised = window_targets(loss_mask, anchors, k)[0] & window_targets(valid, anchors - 1, k)[0]
        mask = eagle3_position_mask(supervised, label_argmax, drafter.t2d)  # (B, T, K)
        weights = step_weights(k, self.args.step_weight_decay, logits.device)
        denominator = valid.sum().clamp(min=1)
        loss = logits.new_zeros((), dtype=torch.float32)
        stats = torch.zeros(4, k, device=logits.device)
        if self.args.loss in ROW_LOSSES:
            for j in range(min(k, t - 2)):
                n = t - 2 - j  # rows r whose predicted token x_{r+2+j} exists
                labelled = slice(1 + j, 1 + j + n)
                rows = drafter_loss(
                    self.args.loss,
                    logits[:, :n, j],
                    labels.logits[:, labelled],
                    labels.logsumexp[:, labelled],
                )
                step_loss = torch.where(mask[:, :n, j], rows, 0.0).sum()
                loss = loss + weights[j] * step_loss / denominator
                stats[0, j] = step_loss.detach()
        window_weight = 1.0 if self.args.loss == "window" else self.args.window_loss_weight
        window_stats = torch.zeros(2, device=logits.device)
        if window_weight:
            window_losses, expected = self._window_objective(drafter, logits, label_argmax, mask)
            loss = loss + window_weight * window_losses.sum() / denominator
            windows = supervised[..., 0]  # every assistant anchor (E[R] = 0 where x*_1 is out of vocabulary)
            window_stats = torch.stack([expected[windows].sum(), windows.sum()]).detach().float()
        with torch.no_grad():
            correct = drafter.draft_to_target(logits.argmax(-1)) == label_argmax
            stats[1:] = torch.stack(
                [mask.sum((0, 1)), (correct & supervised).sum((0, 1)), supervised.sum((0, 1))]
            )
        return loss, {"steps": stats, "window": window_stats}

    def _window_objective(
        self, drafter: PreTrainedModel, logits: torch.Tensor, label_argmax: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`window_loss` and E[R] (B, T) of the window at every row at the current temperature; a window ends
        at its first step without a loss (`mask`)."""
        temperature = self.window_temperature()
        ids = drafter.target_to_draft(label_argmax)  # -1 outside the draft vocabulary (masked)
        # One step at a time: fp32 log-probs of all K steps at once would double the unroll's memory.
        logq = torch.stack(
            [token_logprobs(logits[:, :, j], ids[:, :, j], temperature) for j in range(ids.shape[-1])], -1
        )
        return window_loss(logq, mask)

    def window_temperature(self) -> float:
        """T of the window objective now: `window_temperature`, annealed linearly over the run's steps to
        `window_temperature_end` when set."""
        start, end = self.args.window_temperature, self.args.window_temperature_end
        if end is None or not self.state.max_steps:
            return start
        return start + (end - start) * min(self.state.global_step / self.state.max_steps, 1.0)

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        loss, stats = self._ttt_loss(model, inputs, *self._target_batch(inputs))
        self._add_stats("train", stats)
        return (loss, None) if return_outputs else loss

    # ------------------------------------------------------------------------------------------ evaluation
    def prediction_step(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[torch.Tensor, None, None]:
        """Eval loss and per-step statistics, plus the accepted prefix k of the chain and tree windows at every
        assistant anchor (collected for `eval_tau` / `eval_alpha_j` / `eval_tree_tau_w{w}_k{K}`). k is
        gathered per sequence so that the samples a distributed sampler repeats to even out the last batch
        are dropped."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            features, labels = self._target_batch(inputs)
            loss, stats = self._ttt_loss(model, inputs, features, labels)
            accepted = batch_acceptances(model, features, inputs, self.acceptance_shapes)  # (B, T, S)
        self._add_stats("eval", stats)
        accepted = self.accelerator.gather_for_metrics(
            self.accelerator.pad_across_processes(accepted, dim=1, pad_index=-1)
        )
        self._accepted.append(accepted[accepted[..., 0] >= 0])
        return loss.detach(), None, None

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
        self._add_stats("eval", None)
        self._accepted = []
        output = super().evaluation_loop(
            dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix
        )
        output.metrics.update(self._step_metrics("eval", f"{metric_key_prefix}_"))
        output.metrics.update(self._acceptance_metrics(f"{metric_key_prefix}_"))
        return output

    def _acceptance_metrics(self, prefix: str) -> dict[str, float]:
        accepted = torch.cat(self._accepted) if self._accepted else torch.zeros(0, dtype=torch.long)
        self._accepted = []
        if accepted.numel() == 0:
            logger.warning("no assistant anchors in the eval set: tau and alpha are not computed")
            return {}
        (_, chain_window), *trees = self.acceptance_shapes
        metrics = acceptance_metrics(accepted[:, 0], chain_window)
        for column, (width, window) in enumerate(trees, start=1):
            metrics.update(tree_tau_metrics(accepted[:, column], width, window))
        return {f"{prefix}{name}": value for name, value in metrics.items()}

    # ------------------------------------------------------------------------------------------ logging
    def _add_stats(self, mode: str, stats: dict[str, torch.Tensor] | None) -> None:
        """Accumulate a batch's statistics (None: reset the counters)."""
        for name, total in self._stats[mode].items():
            if stats is None:
                total.zero_()
            else:
                total += stats[name]

    def _step_metrics(self, mode: str, prefix: str = "") -> dict[str, float]:
        """Per-step mean loss (over supervised rows) and top-1 accuracy (target argmax, out-of-vocabulary
        targets count as misses), and with the window objective the mean E[R] per window and T, since the
        last call, summed over processes; resets the counters."""
        stats = {
            name: self.accelerator.reduce(total, "sum").tolist() for name, total in self._stats[mode].items()
        }
        self._add_stats(mode, None)
        loss_sum, rows, correct, total = stats["steps"]
        metrics = {}
        for j in range(self.num_steps):
            if rows[j] and self.args.loss in ROW_LOSSES:
                metrics[f"{prefix}step{j}_loss"] = loss_sum[j] / rows[j]
            if total[j]:
                metrics[f"{prefix}step{j}_acc"] = correct[j] / total[j]
        if total[0]:
            metrics[f"{prefix}argmax_in_draft_vocab"] = rows[0] / total[0]
        expected, windows = stats["window"]
        if windows:
            metrics[f"{prefix}window_expected_accepted"] = expected / windows
            metrics[f"{prefix}window_temperature"] = self.window_temperature()
        return metrics

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # the periodic training log
            logs = {**logs, **self._step_metrics("train")}
        super().log(logs, start_time)
