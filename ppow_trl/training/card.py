"""The model card every drafter checkpoint gets: `DrafterCardMixin` for the trainers.

Both trainers write README.md next to every saved drafter (checkpoints and the final save) and in place of
TRL's own card (`create_model_card`), which describes a text-generation model: its quickstart would launch a
drafter as if it were a language model. The card (`ppow_trl.io.drafter_model_card`) records how the
drafter was trained (the trainer's settings, LoRA, the command, the wall time, the data fingerprint from
`split.json` when the recipe copied it into the output folder), the latest held-out evaluation, and how to
serve it. A card that cannot be
written logs a warning and never fails a save.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from ppow_trl import _compat
from ppow_trl.io import check_hub_access, push_to_hub, run_card_inputs, write_drafter_card
from ppow_trl.training.parser import launch_command

logger = logging.getLogger(__name__)


class DrafterCardMixin:
    """Mixed into a `transformers.Trainer` subclass that trains a drafter (put it first in the bases).

    Class attributes: TRL's `_name` (how the card names the training) and `_paper` (the paper its citation
    block gives; default the PPOW paper, this library's), `_card_fields` (the training arguments it lists),
    `_card_window_field` (the argument holding K for the usage snippets).
    """

    _name: str = "supervised warm start"
    _card_fields: tuple[str, ...] = ()
    _card_window_field: str = "window_size"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        _compat.check_trainer_hooks()  # `_save` below and SFT's `prediction_step` use Trainer internals
        super().__init__(*args, **kwargs)

    def _card_kwargs(self) -> dict[str, Any]:
        args = self.args
        training: dict[str, Any] = {"method": self._name, "trainer": type(self).__name__}
        for name in self._card_fields:
            if hasattr(args, name):
                value = getattr(args, name)
                training[name] = list(value) if isinstance(value, (list, tuple)) else value
        if isinstance(getattr(self, "gamma", None), float):
            training["gamma (used)"] = round(self.gamma, 4)
        training["optimizer steps"] = self.state.global_step
        started = getattr(self, "_card_train_started", None)
        if started is not None:  # a resumed run counts from its resume
            training["wall time (this run)"] = f"{(time.perf_counter() - started) / 60:.1f} min"
        training["command"] = launch_command()
        peft_config = getattr(self.model, "peft_config", None)
        if peft_config:
            lora = next(iter(peft_config.values()))
            training["LoRA"] = f"r={lora.r}, alpha={lora.lora_alpha} (merged on export)"
        found = run_card_inputs(args.output_dir) if Path(args.output_dir).is_dir() else {}
        data = (found.get("training") or {}).get("data")
        if data:
            training["data"] = data
        evals = [h for h in self.state.log_history if "eval_tau" in h]
        eval_results = {k: v for k, v in evals[-1].items() if k.startswith("eval_")} if evals else None
        return {
            "training": training,
            "eval_results": eval_results or found.get("eval_results"),
            "report": found.get("report"),
            "repo_id": args.hub_model_id,
            "paper": getattr(self, "_paper", None),
            "num_speculative_tokens": getattr(args, self._card_window_field, None),
        }

    def _write_card(self, directory: str | Path, model_name: str | None = None) -> None:
        try:
            write_drafter_card(self.model, directory, model_name=model_name, **self._card_kwargs())
        except Exception as err:  # a card must never break a save
            logger.warning("could not write the drafter model card in %s: %s", directory, err)

    def train(self, *args, **kwargs):
        self._card_train_started = time.perf_counter()
        return super().train(*args, **kwargs)

    def create_model_card(self, model_name: str | None = None, *args, **kwargs) -> None:
        """The drafter card instead of TRL's / transformers' text-generation card."""
        if self.is_world_process_zero():
            self._write_card(self.args.output_dir, model_name=model_name)

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        """`Trainer._save` (private, checked by `_compat.check_trainer_hooks`) writes every checkpoint and the
        final model: the card goes beside each."""
        super()._save(output_dir, state_dict)
        self._write_card(output_dir or self.args.output_dir)


def hub_preflight(args) -> str | None:
    """Before any training work: when `args.push_to_hub` is set, check the repo id, token and network now
    (`check_hub_access`, which says how to fix each) and take the push over from `Trainer`, which would upload
    checkpoints in this package's layout; `push_trained_drafter` uploads the serving export at the end.
    Returns the token (None when not pushing)."""
    if not getattr(args, "push_to_hub", False):
        return None
    token = check_hub_access(args.hub_model_id, args.hub_token)
    args.push_to_hub = False
    return token


def push_trained_drafter(trainer, token: str | None, format: str = "auto") -> str:
    """Export the trained drafter (LoRA merged; ``auto``: `eagle3` for EAGLE-3, `medusa` for Medusa) with
    its card and upload it to `trainer.args.hub_model_id`."""
    card = trainer._card_kwargs()
    repo_id, k = card.pop("repo_id"), card.pop("num_speculative_tokens")
    return push_to_hub(
        trainer.model,
        repo_id,
        format,
        token=token,
        private=trainer.args.hub_private_repo,
        target=getattr(trainer, "target", None),
        num_speculative_tokens=k,
        card_kwargs=card,
    )
