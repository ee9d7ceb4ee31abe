"""One cost model for decoding and training: the cost c(n) of a cached target forward over n tokens, and the
cost of one drafter step, measured on this hardware.

`measure_costs(target, drafter)` returns a `CostTable` (seconds) and caches it in memory and on disk (under
`ppow_trl.target.cache_root()/costs`, keyed by the hardware, torch threads, dtype, the target's and drafter's
architecture and whether the packed-linear path is used), so a later process on the same machine reads it
back instead of measuring again. Decoding (`num_draft_tokens="auto"`) prices windows with it, and PPOW's
`gamma: auto` is `measure_gamma` = one drafter step / c(K+1) from the same table, so the reward and the
decoder price a window the same way.

The target forward is timed as decoding runs it: through `ppow_trl.packed.packed_linears` where
that applies (CPU fp32, see `use_packed_linears`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass

import torch
from transformers import DynamicCache, PreTrainedModel

from ppow_trl.decoding.drafting import ChainDrafter
from ppow_trl.packed import packed_linears, use_packed_linears
from ppow_trl.target import cache_root, capture_features

__all__ = ["CostTable", "measure_costs", "measure_gamma"]

logger = logging.getLogger(__name__)
_MEMORY: dict[str, CostTable] = {}


@dataclass
class CostTable:
    """Measured costs in seconds: `verify[n-1]` = c(n), a cached target forward (with the LM head and the
    features a drafter reads) over n tokens after a `context_length`-token prefix, batch 1; `draft_step` =
    one chain-drafting step of the drafter (0 without a drafter); `commit` = committing a few verified rows
    to the drafter's cache (once per drafting round)."""

    verify: list[float]
    draft_step: float = 0.0
    commit: float = 0.0
    context_length: int = 128
    packed: bool = False
    key: str = ""

    def c(self, num_tokens: int) -> float:
        """c(n) in seconds (linear extrapolation past the table)."""
        from ppow_trl.decoding.draft_length import verify_cost

        return verify_cost(self.verify, num_tokens)

    def verify_shape(self, num_tokens: int, margin: float = 0.03) -> int:
        """How many tokens a forward that verifies `num_tokens` should run: the cheapest measured count
        m >= n when c(m) is at least `margin` below c(n) (the window is followed by m - n filler tokens whose
        outputs and KV are dropped), else n. Small-M kernel paths make some counts dearer than larger ones (on
        a 2-core CPU with oneDNN: c(2) > c(3))."""
        if num_tokens >= len(self.verify):
            return num_tokens
        cheapest = min(range(num_tokens, len(self.verify) + 1), key=lambda m: (self.verify[m - 1], m))
        return (
            cheapest if self.verify[cheapest - 1] < (1 - margin) * self.verify[num_tokens - 1] else num_tokens
        )

    def padded_verify(self) -> list[float]:
        """c(n) for n = 1..len(verify) when each forward runs `verify_shape(n)` tokens."""
        return [self.c(self.verify_shape(n)) for n in range(1, len(self.verify) + 1)]

    def ratios(self) -> list[float]:
        """c(n)/c(1) for n = 1..len(verify)."""
        return [v / self.verify[0] for v in self.verify]

    def gamma(self, window_size: int) -> float:
        """One drafter step relative to the target forward that verifies a window of K tokens (K+1 tokens)."""
        return self.draft_step / self.c(window_size + 1)


def _clock(device: torch.device):
    """The thread's CPU time for single-threaded CPU runs (time other processes take is not counted, which
    keeps the table stable on a shared machine), else the wall clock."""
    return time.thread_time if device.type == "cpu" and torch.get_num_threads() == 1 else time.perf_counter


def _median_seconds(fn, repeats: int, clock=time.perf_counter) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = clock()
        fn()
        times.append(clock() - start)
    return sorted(times)[len(times) // 2]


def _fingerprint(model: PreTrainedModel | None) -> dict:
    if model is None:
        return {}
    config = model.config
    keys = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "vocab_size", "draft_vocab_size", "num_heads", "aux_layer_ids")  # fmt: skip
    param = next(model.parameters())
    return {
        "class": type(model).__name__,
        "dtype": str(param.dtype),
        "device": str(param.device.type),
        "params": sum(p.numel() for p in model.parameters()),
        **{k: getattr(config, k) for k in keys if getattr(config, k, None) is not None},
    }


def _hardware(device: torch.device) -> dict:
    info = {"machine": platform.machine(), "cpu": platform.processor(), "cores": os.cpu_count(),
            "threads": torch.get_num_threads(), "torch": torch.__version__}  # fmt: skip
    try:
        with open("/proc/cpuinfo") as handle:
            info["cpu"] = next(
                (line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), ""
            )
    except OSError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def cost_key(target: PreTrainedModel, drafter: PreTrainedModel | None, max_tokens: int, context_length: int,
             packed: bool) -> str:  # fmt: skip
    """The cache key of a cost table: hardware, threads, torch, both models' architecture and dtype, the
    measured sizes and the packed-linear path."""
    device = next(target.parameters()).device
    blob = {"hardware": _hardware(device), "target": _fingerprint(target), "drafter": _fingerprint(drafter),
            "max_tokens": max_tokens, "context_length": context_length, "packed": packed}  # fmt: skip
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:20]


@torch.no_grad()
def _measure(target, drafter, max_tokens, context_length, repeats, packed) -> CostTable:
    device = next(target.parameters()).device
    clock = _clock(device)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, target.config.vocab_size, (1, context_length + max_tokens), generator=generator)
    ids = ids.to(device)
    prefix = ids[:, :context_length]
    layers = (
        list(getattr(drafter.config, "aux_layer_ids", None) or []) or None if drafter is not None else None
    )
    head = target.get_output_embeddings()
    cache = DynamicCache(config=target.config)
    with packed_linears(target, packed):
        features = capture_features(
            target, prefix, None, layers, with_logits=False, cache=cache, use_cache=True
        )

        def verify(n: int) -> None:
            out = capture_features(
                target, ids[:, context_length : context_length + n], None, layers, with_logits=False,
                position_ids=torch.arange(context_length, context_length + n, device=device)[None],
                cache=cache, use_cache=True,
            )  # fmt: skip
            head(out.last_hidden_state).float()
            cache.crop(-n)

        # Sizes interleaved, minimum over repeats: a burst of load hits one sample of a size, not the size.
        verify(1)
        samples: list[list[float]] = [[] for _ in range(max_tokens)]
        for _ in range(repeats):
            for n in range(1, max_tokens + 1):
                start = clock()
                verify(n)
                samples[n - 1].append(clock() - start)
        verify_seconds = [min(times) for times in samples]
    draft_step = commit = 0.0
    if drafter is not None:
        chain = ChainDrafter(drafter)
        feats = getattr(features, chain.model.feature_name)
        chain.commit(feats[:, :-1], prefix[:, 1:], torch.arange(context_length - 1, device=device)[None])
        window = min(5, getattr(chain.model, "max_draft_tokens", None) or 5)
        draft_step = _median_seconds(lambda: chain.draft(window), repeats, clock) / window
        last = (feats[:, -1:], ids[:, context_length : context_length + 1])

        def commit_one() -> None:
            saved = (
                chain.state.cache,
                chain.state.cache_valid,
                chain.state.last_hidden,
                chain.state.last_position,
            )
            chain.commit(last[0], last[1], torch.tensor([[context_length - 1]], device=device))
            chain.state.cache, chain.state.cache_valid, chain.state.last_hidden, chain.state.last_position = (
                saved
            )

        commit = _median_seconds(commit_one, repeats, clock)
    return CostTable(verify_seconds, draft_step, commit, context_length, bool(packed))


def measure_costs(
    target: PreTrainedModel,
    drafter: PreTrainedModel | None = None,
    max_tokens: int = 16,
    context_length: int = 128,
    repeats: int = 5,
    packed: bool | str = "auto",
    use_cache: bool = True,
) -> CostTable:
    """c(n) for n = 1..max_tokens (minimum of `repeats`, sizes interleaved) and the drafter's per-step and
    commit costs (medians of `repeats`), cached
    in memory and on disk per hardware/threads/dtype/architecture unless `use_cache=False`."""
    packed = use_packed_linears(target, packed)
    key = cost_key(target, drafter, max_tokens, context_length, packed)
    if use_cache and key in _MEMORY:
        return _MEMORY[key]
    path = cache_root() / "costs" / f"{key}.json"
    if use_cache and path.is_file():
        try:
            table = CostTable(**json.loads(path.read_text()))
            _MEMORY[key] = table
            return table
        except (ValueError, TypeError):
            logger.warning("ignoring an unreadable cost table %s", path)
    table = _measure(target, drafter, max_tokens, context_length, repeats, packed)
    table.key = key
    if use_cache:
        _MEMORY[key] = table
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(asdict(table), indent=1))
            os.replace(tmp, path)
        except OSError as err:
            logger.warning("could not cache the cost table at %s: %s", path, err)
    return table


def measure_gamma(
    target: PreTrainedModel,
    drafter: PreTrainedModel,
    window_size: int,
    context_length: int = 128,
    repeats: int = 5,
    use_cache: bool = True,
) -> float:
    """gamma = (time of one drafter step) / (time of one target forward verifying K+1 tokens after a
    `context_length`-token prefix), both with KV caches, batch size 1, from `measure_costs`."""
    table = measure_costs(
        target, drafter, max_tokens=max(window_size + 1, 16), context_length=context_length, repeats=repeats,
        use_cache=use_cache,
    )  # fmt: skip
    return table.gamma(window_size)
