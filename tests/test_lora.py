"""LoRA drafters end to end: PPOW with a peft config trains only the adapters, checkpoints and resumes them,
and the merged export drafts exactly like the merged model."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel
from transformers import AutoModel

from ppow_trl.export import export_drafter, load_drafter
from ppow_trl.models import unwrap_drafter
from ppow_trl.training.ppow import PPOWTrainer
from tests.ppow_fixtures import tiny_greedy_dataset, tiny_ppow_config
from tests.test_drafting import make_drafter
from tests.test_export import draft


@pytest.fixture(scope="module")
def dataset(tiny_target):
    return tiny_greedy_dataset(tiny_target, num_sequences=8)


def lora_trainer(tiny_target, tiny_tokenizer, dataset, tmp_path, drafter=None, **overrides):
    drafter = drafter or make_drafter("eagle3", tiny_target)
    drafter.config.warm_started = True
    args = tiny_ppow_config(tmp_path, **overrides)
    return PPOWTrainer(
        drafter, tiny_target, args, dataset, tiny_tokenizer, peft_config=LoraConfig(r=4, lora_alpha=8)
    )


def test_ppow_with_lora_trains_adapters_checkpoints_resumes_and_exports_merged(
    tiny_target, tiny_tokenizer, dataset, tmp_path
):
    make_drafter("eagle3", tiny_target).save_pretrained(tmp_path / "warm")  # a saved base, as in the recipe
    base = AutoModel.from_pretrained(tmp_path / "warm")
    trainer = lora_trainer(
        tiny_target, tiny_tokenizer, dataset, tmp_path, base, max_steps=2, save_strategy="steps", save_steps=2
    )
    assert isinstance(trainer.model, PeftModel)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert any(".fc." in n for n in trainable) and not any("lm_head" in n for n in trainable)
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(before[n], p)}
    assert changed and changed <= trainable  # the frozen base weights did not move
    checkpoint = tmp_path / "checkpoint-2"
    assert (checkpoint / "adapter_model.safetensors").is_file() and (checkpoint / "optimizer.pt").is_file()

    # Resume: a fresh trainer on a fresh copy of the same base loads the adapters of step 2 ...
    trained = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    reloaded = lora_trainer(
        tiny_target,
        tiny_tokenizer,
        dataset,
        tmp_path,
        AutoModel.from_pretrained(tmp_path / "warm"),
        max_steps=2,
    )
    reloaded.train(resume_from_checkpoint=str(checkpoint))  # nothing left to train: only loads
    for name, param in reloaded.model.named_parameters():
        assert torch.equal(param, trained[name]), name
    # ... and continues from them.
    resumed = lora_trainer(
        tiny_target,
        tiny_tokenizer,
        dataset,
        tmp_path,
        AutoModel.from_pretrained(tmp_path / "warm"),
        max_steps=3,
    )
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 3
    assert isinstance(resumed.model, PeftModel)

    # Export merges the adapters; the exported drafter drafts exactly like the merged model. The saved
    # adapter folder loads too (its base is the saved warm start), merged.
    resumed.save_model(str(tmp_path / "final"))
    assert (tmp_path / "final" / "adapter_model.safetensors").is_file()
    out = export_drafter(resumed.model, tmp_path / "export", "eagle3")
    loaded = load_drafter(out, tiny_target)
    from_adapters = load_drafter(tmp_path / "final", tiny_target)
    merged = unwrap_drafter(resumed.model.merge_and_unload()).eval()
    ref_tokens, ref_logprobs, _ = draft(merged, tiny_target)
    for candidate in (loaded, from_adapters):
        tokens, logprobs, _ = draft(candidate, tiny_target)
        assert torch.equal(tokens, ref_tokens) and torch.equal(logprobs, ref_logprobs)


def test_sft_with_lora_checkpoints_resumes_and_exports_merged(tiny_target, tiny_tokenizer, dataset, tmp_path):
    from ppow_trl.training import DrafterSFTConfig, DrafterSFTTrainer

    make_drafter("eagle3", tiny_target).save_pretrained(tmp_path / "base")

    def trainer(max_steps):
        args = DrafterSFTConfig(
            output_dir=str(tmp_path / "sft"), max_steps=max_steps, per_device_train_batch_size=4, window_size=2,
            save_strategy="steps", save_steps=2, report_to="none", use_cpu=True, learning_rate=1e-2,
        )  # fmt: skip
        return DrafterSFTTrainer(
            AutoModel.from_pretrained(tmp_path / "base"), tiny_target, args, train_dataset=dataset,
            processing_class=tiny_tokenizer, peft_config=LoraConfig(r=4, lora_alpha=8),
        )  # fmt: skip

    first = trainer(2)
    first.train()
    checkpoint = tmp_path / "sft" / "checkpoint-2"
    assert (checkpoint / "adapter_model.safetensors").is_file() and (checkpoint / "README.md").is_file()
    trained = {n: p.detach().clone() for n, p in first.model.named_parameters()}
    again = trainer(2)
    again.train(resume_from_checkpoint=str(checkpoint))
    for name, param in again.model.named_parameters():
        assert torch.equal(param, trained[name]), name
    out = export_drafter(again.model, tmp_path / "export", "eagle3")
    merged = unwrap_drafter(again.model.merge_and_unload()).eval()
    assert torch.equal(draft(load_drafter(out, tiny_target), tiny_target)[1], draft(merged, tiny_target)[1])
