"""Batched drafting at every anchor of a batch vs a Python loop of chain drafting per anchor.

    python benchmarks/drafting.py [--batch 2] [--seq-len 128] [--window-size 5] [--draft-vocab-size 8192]

Both draft greedy windows of K tokens at every anchor row of the same sequences with the same EAGLE-3
drafter on the embedded target's features (the loop: a fresh `ChainDrafter` per anchor that commits
rows 0..r and drafts K tokens, i.e. what decoding does once per position). Also reports the peak
resident memory of loading the embedded target (a fresh process, ru_maxrss).
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from ppow_trl.decoding.drafting import ChainDrafter, draft_windows  # noqa: E402
from ppow_trl.models.build import build_drafter  # noqa: E402
from ppow_trl.target import capture_features, load_target  # noqa: E402

LOAD_ONLY = "import resource, ppow_trl.target as t; t.load_target('embedded'); print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--window-size", type=int, default=5)
    parser.add_argument("--draft-vocab-size", type=int, default=8192)
    cli = parser.parse_args()

    peak_kib = int(
        subprocess.run(
            [sys.executable, "-c", LOAD_ONLY], capture_output=True, text=True, check=True
        ).stdout.split()[-1]
    )
    target, tokenizer = load_target("embedded")
    torch.manual_seed(0)
    ids = torch.randint(100, target.config.vocab_size, (cli.batch, cli.seq_len))
    features = capture_features(target, ids, with_logits=False).aux_hidden_states
    drafter = build_drafter("eagle3", target)
    if cli.draft_vocab_size < target.config.vocab_size:
        from ppow_trl.data.draft_vocab import build_draft_vocab

        vocab = build_draft_vocab(draft_vocab_size=cli.draft_vocab_size, vocab_size=target.config.vocab_size,
                                  sequences=ids.tolist(), loss_masks=torch.ones_like(ids).tolist())  # fmt: skip
        drafter = build_drafter("eagle3", target, vocab)
    drafter.eval()
    k = cli.window_size
    anchors = torch.arange(cli.seq_len - 1).expand(cli.batch, -1)

    with torch.no_grad():
        draft_windows(drafter, features, ids, anchors[:, :4], k)  # warm-up
        start = time.perf_counter()
        batched = draft_windows(drafter, features, ids, anchors, k).tokens[:, :, 0]
        batched_s = time.perf_counter() - start
        start = time.perf_counter()
        looped = torch.empty_like(batched)
        for b in range(cli.batch):
            for r in range(cli.seq_len - 1):
                chain = ChainDrafter(drafter)
                chain.commit(
                    features[b : b + 1, : r + 1], ids[b : b + 1, 1 : r + 2], torch.arange(r + 1)[None]
                )
                looped[b, r] = chain.draft(k)[0][0]
        loop_s = time.perf_counter() - start
    windows = anchors.numel()
    print(
        f"embedded target, EAGLE-3 drafter (draft vocab {drafter.config.draft_vocab_size}), batch {cli.batch} x "
        f"{cli.seq_len} tokens, K={k}, {windows} windows, greedy, threads={torch.get_num_threads()}"
    )
    print("| path | seconds | windows/s |\n|---|---|---|")
    print(f"| batched draft_windows (K passes) | {batched_s:.3f} | {windows / batched_s:.0f} |")
    print(f"| loop of ChainDrafter per anchor | {loop_s:.3f} | {windows / loop_s:.0f} |")
    print(
        f"speedup of batched drafting: {loop_s / batched_s:.1f}x; identical windows: {int((batched == looped).all(-1).sum())}/{windows}"
    )
    print(f"peak RSS of loading the embedded target (fresh process): {peak_kib / 1024:.0f} MiB")
    print(f"this process peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
