"""Run by tests/test_ppow.py under `accelerate launch` with recipes/accelerate_configs/cpu_ddp.yaml (2 processes, gloo): a few PPOW steps, then each rank
writes its drafter weights and, for every rollout, its local window rewards and advantages."""

import os
import sys

import torch

sys.path.insert(0, os.getcwd())
from ppow_trl.training.ppow import PPOWTrainer  # noqa: E402
from tests.conftest import build_tiny_target, build_tiny_tokenizer  # noqa: E402
from tests.ppow_fixtures import tiny_greedy_dataset, tiny_ppow_config  # noqa: E402
from tests.test_drafting import make_drafter  # noqa: E402


class RecordingTrainer(PPOWTrainer):
    records: list = []

    def _group_advantages(self, rewards, has_anchor):
        advantages, std = super()._group_advantages(rewards, has_anchor)
        total = (rewards * self.reward_weights).sum(-1)
        self.records.append(
            {"total": total.clone(), "advantages": advantages.clone(), "has": has_anchor.clone()}
        )
        return advantages, std


def main(out_dir: str) -> None:
    tokenizer = build_tiny_tokenizer()
    target = build_tiny_target(len(tokenizer))
    drafter = make_drafter("eagle3", target)
    config = tiny_ppow_config(out_dir, per_device_train_batch_size=2, max_steps=3, proximity_eps=1e9)
    trainer = RecordingTrainer(drafter, target, config, tiny_greedy_dataset(target, 8), tokenizer)
    trainer.train()
    rank = trainer.accelerator.process_index
    torch.save(
        {"state": {k: v.detach().cpu() for k, v in drafter.state_dict().items()}, "records": trainer.records},
        os.path.join(out_dir, f"rank{rank}.pt"),
    )
    # Tear the gloo group down before exit: left to interpreter shutdown, a rank can abort
    # ("terminate called without an active exception") after its work is done.
    trainer.accelerator.wait_for_everyone()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
