"""The draft-length policy ("auto") against every fixed K on simulated drafters, in cost units, no models.

    python benchmarks/draft_length_policy.py [--rounds 3000] [--seeds 3]

A simulated drafter has, at each position, a confidence in logit space that follows an AR(1) process (mean
`mean`, correlation `rho` between neighbouring positions, spread `spread`), falling by 0.3 logits per draft
step. A step is accepted with probability `truth` x confidence ("calibrated" when truth = 1); the policy sees
the confidence, or a constant (`said`) for a drafter whose confidence says nothing per step. Rounds are priced
with a cost table of the shape measured on a 2-core CPU with packed linears and padded verification (c(n) ~
c(1) up to 9 tokens, one drafter step 0.076 and a commit 0.053 of a plain step). Prints tokens per unit of
cost for K = 0 (plain), 1, 2, 3, 5 and auto, and auto / best fixed K, averaged over seeds.
"""

from __future__ import annotations

import argparse
import math
import random

import torch

from ppow_trl.decoding.draft_length import DraftLengthPolicy

COSTS = [1.0, 1.02, 1.02, 1.02, 1.02, 1.02, 1.03, 1.03, 1.03]
DRAFT_STEP, COMMIT = 0.076, 0.053

# (name, mean, rho, spread, truth, said)
CASES = [
    ("calibrated, rho 0.6", 0.3, 0.6, 1.5, 1.0, None),
    ("calibrated, rho 0", 0.3, 0.0, 1.5, 1.0, None),
    ("calibrated, rho 0.9, wide", 0.3, 0.9, 2.5, 1.0, None),
    ("calibrated, strong", 0.5, 0.6, 1.5, 1.0, None),
    ("calibrated, weak", 0.15, 0.6, 1.5, 1.0, None),
    ("over-confident (x0.7)", 0.3, 0.6, 1.5, 0.7, None),
    ("uninformative, says 0.3", 0.3, 0.6, 1.5, 1.0, 0.3),
    ("uninformative, says 0.1 (under-confident)", 0.3, 0.6, 1.5, 1.0, 0.1),
    ("uninformative, says 0.2, truth ~0.5", 0.5, 0.6, 1.5, 1.0, 0.2),
    ("uninformative, says 0.5, truth ~0.15", 0.15, 0.6, 1.5, 1.0, 0.5),
]


def confidences(n: int, mean: float, rho: float, spread: float, rng: random.Random) -> list[float]:
    base, z, out = math.log(mean / (1 - mean)), 0.0, []
    for _ in range(n):
        z = rho * z + math.sqrt(1 - rho * rho) * rng.gauss(0, spread)
        out.append(base + z)
    return out


def simulate(fixed: int | None, case: tuple, rounds: int, seed: int) -> float:
    _, mean, rho, spread, truth, said = case
    rng = random.Random(seed)
    logits = confidences(rounds * 10, mean, rho, spread, rng)
    conf = lambda pos, j: 1 / (1 + math.exp(-(logits[pos + j - 1] - 0.3 * (j - 1))))  # noqa: E731
    policy = None if fixed is not None else DraftLengthPolicy("auto", 8, COSTS, DRAFT_STEP, COMMIT)
    pos = tokens = 0
    cost = 0.0
    for _ in range(rounds):
        steps = window = 0
        if policy is None:
            steps = window = fixed
        elif policy.start_round(1):
            for j in range(1, 9):
                steps += 1
                include, more = policy.include(torch.tensor([said if said is not None else conf(pos, j)]), j)
                window = j if include else window
                if not (include and more):
                    break
        accepted = 0
        while accepted < window and rng.random() < min(1.0, truth * conf(pos, accepted + 1)):
            accepted += 1
        if policy is not None:
            policy.end_round(window, torch.tensor([accepted]))
        cost += COSTS[window] + steps * DRAFT_STEP + (COMMIT if steps else 0.0)
        tokens += accepted + 1
        pos += accepted + 1
    return tokens / cost


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3000)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    print(
        "| drafter | K=0 | K=1 | K=2 | K=3 | K=5 | auto | auto / best fixed K |\n|---|---|---|---|---|---|---|---|"
    )
    worst = 1.0
    for case in CASES:
        rate = {
            k: sum(simulate(k, case, args.rounds, s) for s in range(args.seeds)) / args.seeds
            for k in (0, 1, 2, 3, 5)
        }
        auto = sum(simulate(None, case, args.rounds, s) for s in range(args.seeds)) / args.seeds
        ratio = auto / max(rate.values())
        worst = min(worst, ratio)
        cells = " | ".join(f"{rate[k]:.3f}" for k in (0, 1, 2, 3, 5))
        print(f"| {case[0]} | {cells} | {auto:.3f} | {ratio:.3f} |")
    print(f"\nworst auto / best fixed K: {worst:.3f}")


if __name__ == "__main__":
    main()
