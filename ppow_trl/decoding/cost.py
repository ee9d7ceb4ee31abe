"""One cost model for decoding and training: the cost c(n) of a cached target forward over n tokens, and the
cost of one drafter step, measured on this hardware.

`measure_costs(target, drafter)` returns a `CostTable` (seconds) and caches it in memory and on disk (under
`ppow_trl.target.cache_root()/costs`, keyed by the hardware, torch threads, dtype, the target's and drafter's
architecture and whether the packed-linear path is used), so a later process on the same machine reads it
back instead of measuring again. Decoding (`num_draft_tokens="auto"`) prices windows with it, and PPOW's
`gamma: auto` is `measure_gamma` = one drafter step / c(K+1) from the same table, so the reward and the
decoder price a window the same way.

A table must stay true after it is cached, so a measurement that other jobs disturbed is not kept:
- every entry is the minimum of `repeats` interleaved timings (load only ever adds time);
- `check_costs` asks that c(n) does not fall with n beyond kernel-shape noise and that the drafter step is
  plausible against a verification given both models' sizes (linear-layer weights and layer counts);
- `MachineLoad` records what other processes used of the CPU while measuring;
a failed check or a loaded machine re-measures (entrywise minimum over attempts), and a table that still
fails is used for this process only, never cached. The table records its time, load and problems.
`CostMonitor` then compares the costs decoding actually observes with the table and switches to the observed
ones (and marks the cached table stale) when they disagree. `PPOW_TRL_REMEASURE_COSTS=1` (or
`measure_costs(..., remeasure=True)`) ignores the disk cache.

The target forward and the drafter step are timed as decoding runs them: through
`ppow_trl.packed.packed_linears` where that applies (CPU fp32, see `use_packed_linears`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache, PreTrainedModel

from ppow_trl.decoding.draft_length import top_probability
from ppow_trl.decoding.drafting import ChainDrafter
from ppow_trl.packed import packed_linears, use_packed_linears
from ppow_trl.target import cache_root, capture_features

__all__ = [
    "CostMonitor",
    "CostTable",
    "ImplausibleCostsError",
    "MachineLoad",
    "check_costs",
    "cost_clock",
    "measure_costs",
    "measure_gamma",
]

logger = logging.getLogger(__name__)
_MEMORY: dict[str, CostTable] = {}
CACHE_VERSION = 3  # v1 tables carry no time, load or checks; v2 timed the drafter on stock linears
REMEASURE_ENV = "PPOW_TRL_REMEASURE_COSTS"
# Other processes may use this many cores beyond those our threads leave free before the machine is loaded.
LOAD_TOLERANCE = 0.25
MIN_OWN_SHARE = 0.85  # a single-threaded measurement that got less of its core than this was crowded out
# A drafter step may cost at most this multiple of max(linear-weight ratio, layer ratio) of a 1-token
# verification, and at least this fraction of the smaller of the two (per-call overheads dominate tiny
# forwards, so wall time follows the layer count more than the FLOPs; on an idle 2-core CPU the shipped
# drafter's step is 2-3% of the embedded target's forward, which has 30 layers).
PLAUSIBLE_DRAFT_FACTOR = 4.0
PLAUSIBLE_DRAFT_FLOOR = 0.02  # loose: Medusa computes its heads at once, its later steps cost little
MONOTONE_TOLERANCE = 0.25  # c(n) may dip this far below a shorter forward's cost (small-M kernel paths)


class ImplausibleCostsError(ValueError):
    """A cost table that failed its checks even after re-measuring (see `check_costs`)."""


@dataclass
class CostTable:
    """Measured costs in seconds: `verify[n-1]` = c(n), a cached target forward (with the LM head and the
    features a drafter reads) over n tokens after a `context_length`-token prefix, batch 1; `draft_step` =
    one chain-drafting step of the drafter (0 without a drafter); `commit` = committing a few verified rows
    to the drafter's cache (once per drafting round).

    Provenance (0 / empty for a table written by hand): `measured_at` (Unix time), `load` (`MachineLoad`
    during the measurement), `clock` (what timed it: "thread_time" or "perf_counter"), `problems` (failed
    checks; a table with problems is never cached), `source` ("measured", "cache" or "observed": corrected
    from timed decoding rounds), `stale` (why the cached copy must be re-measured, set by `CostMonitor`)."""

    verify: list[float]
    draft_step: float = 0.0
    commit: float = 0.0
    context_length: int = 128
    packed: bool = False
    key: str = ""
    measured_at: float = 0.0
    load: dict[str, Any] = field(default_factory=dict)
    clock: str = ""
    problems: list[str] = field(default_factory=list)
    source: str = ""
    stale: str = ""

    def c(self, num_tokens: int) -> float:
        """c(n) in seconds (linear extrapolation past the table)."""
        from ppow_trl.decoding.draft_length import verify_cost

        return verify_cost(self.verify, num_tokens)

    def verify_shape(self, num_tokens: int, margin: float = 0.08) -> int:
        """How many tokens a forward that verifies `num_tokens` should run: the cheapest measured count
        m >= n when c(m) is at least `margin` below c(n) (the window is followed by m - n filler tokens whose
        outputs and KV are dropped), else n. Small-M kernel paths make some counts dearer than larger ones (on
        a 2-core CPU with oneDNN: c(2) > c(3)). The margin is wider than the table's noise: entries are minimums
        of a few timings, and a 3% margin once padded every plain step to 2 tokens on a table whose c(2) read 4%
        below c(1), rounds that then cost 5-9% more than plain `generate`'s steps."""
        if num_tokens >= len(self.verify):
            return num_tokens
        cheapest = min(range(num_tokens, len(self.verify) + 1), key=lambda m: (self.verify[m - 1], m))
        return (
            cheapest if self.verify[cheapest - 1] < (1 - margin) * self.verify[num_tokens - 1] else num_tokens
        )

    def tree_room(self, num_tokens: int, tolerance: float = 0.03) -> int:
        """The most tokens a verification forward of at least `num_tokens` can run for at most `tolerance` more
        than the cheapest such forward (`verify_shape`): room for a draft tree's nodes that costs
        close to nothing (on CPU, c(n) is nearly flat for small n once the linears run on packed weights)."""
        base = self.verify_shape(num_tokens)
        if base >= len(self.verify):
            return base
        limit = (1 + tolerance) * self.verify[base - 1]
        return max(m for m in range(base, len(self.verify) + 1) if self.verify[m - 1] <= limit)

    def padded_verify(self) -> list[float]:
        """c(n) for n = 1..len(verify) when each forward runs `verify_shape(n)` tokens."""
        return [self.c(self.verify_shape(n)) for n in range(1, len(self.verify) + 1)]

    def ratios(self) -> list[float]:
        """c(n)/c(1) for n = 1..len(verify)."""
        return [v / self.verify[0] for v in self.verify]

    def gamma(self, window_size: int) -> float:
        """One drafter step relative to the target forward that verifies a window of K tokens (K+1 tokens)."""
        return self.draft_step / self.c(window_size + 1)

    def summary(self) -> dict[str, Any]:
        """What a report prints about the table in use: origin, age, load during measurement, drafter step
        and c(6) relative to a 1-token verification, failed checks."""
        age = time.time() - self.measured_at if self.measured_at else None
        return {
            "key": self.key,
            "source": self.source or "given",
            "measured_at": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.measured_at))
            if self.measured_at
            else None,
            "age_s": age,
            "load": self.load,
            "clock": self.clock,
            "draft_verify_ratio": self.draft_step / self.verify[0],
            "c6_over_c1": self.c(6) / self.verify[0],
            "problems": list(self.problems),
            "stale": self.stale or None,
        }

    def describe(self) -> str:
        """One line for logs and results.md."""
        s = self.summary()
        parts = [f"cost table {s['key'] or '(given)'} [{s['source']}]"]
        if s["age_s"] is not None:
            parts.append(f"measured {s['measured_at']} ({_age(s['age_s'])} ago)")
        if self.load:
            parts.append(
                f"load average {self.load.get('load_average', float('nan')):.2f}, other processes "
                f"{self.load.get('others_busy_cores', float('nan')):.2f} of {self.load.get('cores')} cores"
                + (" (loaded)" if self.load.get("loaded") else "")
            )
        parts.append(f"drafter step = {100 * s['draft_verify_ratio']:.1f}% of a 1-token verification")
        parts.append(f"c(6)/c(1) = {s['c6_over_c1']:.2f}")
        if self.problems:
            parts.append("problems: " + "; ".join(self.problems))
        return ", ".join(parts)


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


# ------------------------------------------------------------------------------------------- machine load
def _busy_seconds() -> float | None:
    """CPU seconds all processes have used since boot (Linux /proc/stat), or None elsewhere."""
    try:
        with open("/proc/stat") as handle:
            values = [int(v) for v in handle.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    # user nice system idle iowait irq softirq steal ...: everything but idle and iowait
    busy = sum(values[:3]) + sum(values[5:8])
    return busy / os.sysconf("SC_CLK_TCK")


class MachineLoad:
    """What other processes used of the CPU between construction and `result()`.

    `others_busy_cores` = (CPU seconds of all processes - this process's) / wall seconds (Linux; elsewhere
    the 1-minute load average minus our threads). The machine counts as loaded when other processes need
    cores our `threads` use (more than `cores - threads + LOAD_TOLERANCE`), or when a single-threaded run got
    less than `MIN_OWN_SHARE` of its core."""

    def __init__(self, threads: int | None = None):
        self.threads = threads or torch.get_num_threads()
        self.cores = os.cpu_count() or 1
        self._start = (time.perf_counter(), time.process_time(), _busy_seconds())

    def result(self) -> dict[str, Any]:
        wall0, own0, busy0 = self._start
        wall, own, busy = time.perf_counter() - wall0, time.process_time() - own0, _busy_seconds()
        load_average = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        if busy is not None and busy0 is not None and wall > 0.2:
            others = max(busy - busy0 - own, 0.0) / wall
        else:
            others = max(load_average - self.threads, 0.0)
        own_share = own / wall if wall > 0.2 else 1.0
        crowded = self.threads == 1 and own_share < MIN_OWN_SHARE
        loaded = others > self.cores - self.threads + LOAD_TOLERANCE or crowded
        return {
            "load_average": round(load_average, 3),
            "others_busy_cores": round(others, 3),
            "own_cpu_share": round(own_share, 3),
            "cores": self.cores,
            "threads": self.threads,
            "loaded": bool(loaded),
        }


# ------------------------------------------------------------------------------------------- measurement
def cost_clock(device: torch.device | str) -> Callable[[], float]:
    """The thread's CPU time for single-threaded CPU runs (time other processes take is not counted, which
    keeps the table stable on a shared machine), else the wall clock. Decoding times its rounds with the
    same clock, so observed and measured costs compare."""
    device = torch.device(device)
    return time.thread_time if device.type == "cpu" and torch.get_num_threads() == 1 else time.perf_counter


def _min_seconds(fn, repeats: int, clock=time.perf_counter) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = clock()
        fn()
        times.append(clock() - start)
    return min(times)


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


def hardware_info(device: torch.device | None = None) -> dict[str, Any]:
    """The machine a timing belongs to: CPU model, cores, torch threads, platform and the GPU of `device`
    (default: the first one, if any). Cost tables are cached per this; evaluation results record it."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(
                (line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), cpu
            )
    except OSError:
        pass
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return {
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }


def cost_key(target: PreTrainedModel, drafter: PreTrainedModel | None, max_tokens: int, context_length: int,
             packed: bool) -> str:  # fmt: skip
    """The cache key of a cost table: hardware, threads, torch, both models' architecture and dtype, the
    measured sizes, the packed-linear path and the table format."""
    device = next(target.parameters()).device
    blob = {"hardware": hardware_info(device), "torch": torch.__version__, "target": _fingerprint(target),
            "drafter": _fingerprint(drafter), "max_tokens": max_tokens, "context_length": context_length,
            "packed": packed, "version": CACHE_VERSION}  # fmt: skip
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:20]


@torch.no_grad()
def _measure(target, drafter, max_tokens, context_length, repeats, packed) -> CostTable:
    device = next(target.parameters()).device
    clock = cost_clock(device)
    load = MachineLoad()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, target.config.vocab_size, (1, context_length + max_tokens), generator=generator)
    ids = ids.to(device)
    prefix = ids[:, :context_length]
    layers = (
        list(getattr(drafter.config, "aux_layer_ids", None) or []) or None if drafter is not None else None
    )
    head = target.get_output_embeddings()
    cache = DynamicCache(config=target.config)
    # the drafter's linears too: decoding packs both (small-M oneDNN calls beat MKL's repacking there as well)
    with packed_linears(target, packed), packed_linears(drafter, packed and drafter is not None):
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

            def draft_window() -> None:  # as decoding drafts: step by step, reading the confidence of each
                for _token, _probs, logits in chain.draft_steps(window):
                    top_probability(logits).cpu()

            draft_step = _min_seconds(draft_window, repeats, clock) / window
            last = (feats[:, -1:], ids[:, context_length : context_length + 1])

            def commit_one() -> None:
                saved = (
                    chain.state.cache,
                    chain.state.cache_valid,
                    chain.state.last_hidden,
                    chain.state.last_position,
                )
                chain.commit(last[0], last[1], torch.tensor([[context_length - 1]], device=device))
                (
                    chain.state.cache,
                    chain.state.cache_valid,
                    chain.state.last_hidden,
                    chain.state.last_position,
                ) = saved

            commit = _min_seconds(commit_one, repeats, clock)
    return CostTable(
        verify_seconds, draft_step, commit, context_length, bool(packed), measured_at=time.time(),
        load=load.result(), clock=clock.__name__, source="measured",
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------ checks
def _linear_weights(model: torch.nn.Module) -> int:
    """Weights of the linear layers (what a forward multiplies by; embeddings are lookups)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def plausible_draft_ratio(target: PreTrainedModel, drafter: PreTrainedModel) -> tuple[float, float]:
    """(lowest, highest) plausible drafter step / 1-token verification: one drafter step runs one block
    (EAGLE-3's layer, one Medusa head) and the draft head, against the target's layers and LM head."""
    weights = _linear_weights(drafter) / max(_linear_weights(target), 1)
    layers = 1.0 / max(int(getattr(target.config, "num_hidden_layers", 1) or 1), 1)
    return PLAUSIBLE_DRAFT_FLOOR * min(weights, layers), PLAUSIBLE_DRAFT_FACTOR * max(weights, layers)


def check_costs(
    table: CostTable, target: PreTrainedModel | None = None, drafter: PreTrainedModel | None = None
) -> list[str]:
    """What is wrong with a table (empty: nothing found): entries that are not positive, c(n) falling more
    than `MONOTONE_TOLERANCE` below a shorter forward's cost, and (given both models) a drafter step outside
    `plausible_draft_ratio`."""
    verify = table.verify
    if not verify or any(not (v > 0 and math.isfinite(v)) for v in verify):
        return ["c(n) has entries that are not positive"]
    problems = []
    longest = 0.0
    for n, value in enumerate(verify, start=1):
        if value < (1 - MONOTONE_TOLERANCE) * longest:
            problems.append(
                f"c({n}) = {value / verify[0]:.2f} c(1) is below a shorter forward's {longest / verify[0]:.2f}"
            )
            break
        longest = max(longest, value)
    if target is not None and drafter is not None:
        low, high = plausible_draft_ratio(target, drafter)
        ratio = table.draft_step / verify[0]
        if not low <= ratio <= high:
            problems.append(
                f"a drafter step costs {100 * ratio:.1f}% of a 1-token verification, outside the "
                f"{100 * low:.2f}-{100 * high:.0f}% these two models' sizes allow"
            )
    return problems


# --------------------------------------------------------------------------------------- cache and entry
def _cache_path(key: str) -> Path:
    return cache_root() / "costs" / f"{key}.json"


def _write(table: CostTable) -> None:
    path = _cache_path(table.key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(asdict(table), indent=1))
        os.replace(tmp, path)
    except OSError as err:
        logger.warning("could not cache the cost table at %s: %s", path, err)


def _read(key: str) -> CostTable | None:
    path = _cache_path(key)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        known = {f.name for f in fields(CostTable)}
        return CostTable(**{k: v for k, v in data.items() if k in known})
    except (ValueError, TypeError):
        logger.warning("ignoring an unreadable cost table %s", path)
        return None


def _reason_to_remeasure(table: CostTable, target, drafter) -> str:
    if table.stale:
        return f"it was marked stale ({table.stale})"
    if not table.measured_at:
        return "it records no measurement time"
    problems = table.problems or check_costs(table, target, drafter)
    return "; ".join(problems)


def measure_costs(
    target: PreTrainedModel,
    drafter: PreTrainedModel | None = None,
    max_tokens: int = 16,
    context_length: int = 128,
    repeats: int = 5,
    packed: bool | str = "auto",
    use_cache: bool = True,
    remeasure: bool = False,
    attempts: int = 2,
) -> CostTable:
    """c(n) for n = 1..max_tokens and the drafter's per-step and commit costs (each the minimum of `repeats`,
    verification sizes interleaved), cached in memory and on disk per hardware/threads/dtype/architecture
    unless `use_cache=False`.

    A cached table that was marked stale, records no measurement time or fails `check_costs` is measured
    again; so is everything with `remeasure=True`, and the disk cache is skipped (once per process) when the
    environment sets `PPOW_TRL_REMEASURE_COSTS=1`. A measurement that fails `check_costs` or ran on a
    loaded machine (`MachineLoad`) is repeated up to `attempts` times in all (entrywise minimum); if it still
    fails it is used in this process but not written to disk, with a warning."""
    packed = use_packed_linears(target, packed)
    key = cost_key(target, drafter, max_tokens, context_length, packed)
    if use_cache and not remeasure and key in _MEMORY:
        return _MEMORY[key]
    if use_cache and not remeasure and os.environ.get(REMEASURE_ENV, "") not in ("", "0"):
        remeasure = True
        logger.info("%s is set: measuring the cost table again", REMEASURE_ENV)
    cached = _read(key) if use_cache and not remeasure else None
    if cached is not None:
        reason = _reason_to_remeasure(cached, target, drafter)
        if not reason:
            cached.key, cached.source = key, "cache"
            _MEMORY[key] = cached
            logger.info("Using the %s", cached.describe())
            return cached
        logger.warning("Measuring the cost table %s again: %s", key, reason)
    table = None
    for attempt in range(max(attempts, 1)):
        fresh = _measure(target, drafter, max_tokens, context_length, repeats, packed)
        if table is not None:  # entrywise minimum: load only ever adds time
            fresh.verify = [min(a, b) for a, b in zip(table.verify, fresh.verify)]
            fresh.draft_step = min(table.draft_step, fresh.draft_step)
            fresh.commit = min(table.commit, fresh.commit)
            fresh.load = {**fresh.load, "loaded": bool(fresh.load.get("loaded") and table.load.get("loaded"))}
        table = fresh
        table.problems = check_costs(table, target, drafter)
        if table.load.get("loaded"):
            table.problems.append(
                f"measured on a loaded machine (other processes used {table.load['others_busy_cores']:.2f} "
                f"of {table.load['cores']} cores, {table.load['threads']} torch threads here)"
            )
        if not table.problems:
            break
        if attempt + 1 < attempts:
            logger.info(
                "Cost table attempt %d failed (%s); measuring again", attempt + 1, "; ".join(table.problems)
            )
    table.key = key
    logger.info("Measured the %s", table.describe())
    if table.problems:
        logger.warning(
            "The cost table was not cached (%s); it is used for this process only and decoding corrects it "
            "from timed rounds. Measure on a quieter machine, or set %s=1 later.",
            "; ".join(table.problems),
            REMEASURE_ENV,
        )
    if use_cache:
        _MEMORY[key] = table
        if not table.problems:
            _write(table)
    return table


def mark_stale(table: CostTable, reason: str, replacement: CostTable | None = None) -> None:
    """Record on the cached copy of `table` that it must be measured again (`reason`), and let this process
    use `replacement` for its key from now on."""
    if not table.key:
        return
    if replacement is not None and table.key in _MEMORY:
        _MEMORY[table.key] = replacement
    cached = _read(table.key)
    if cached is not None and not cached.stale:
        cached.stale = reason
        _write(cached)


def measure_gamma(
    target: PreTrainedModel,
    drafter: PreTrainedModel,
    window_size: int,
    context_length: int = 128,
    repeats: int = 5,
    use_cache: bool = True,
) -> float:
    """gamma = (time of one drafter step) / (time of one target forward verifying K+1 tokens after a
    `context_length`-token prefix), both with KV caches, batch size 1, from `measure_costs`. Raises
    `ImplausibleCostsError` when the drafter step stays implausible after re-measuring (a gamma from a
    disturbed measurement would train against the wrong trade-off for the whole run)."""
    table = measure_costs(
        target, drafter, max_tokens=max(window_size + 1, 16), context_length=context_length, repeats=repeats,
        use_cache=use_cache,
    )  # fmt: skip
    implausible = [p for p in check_costs(table, target, drafter) if "drafter step" in p]
    if implausible:
        raise ImplausibleCostsError(
            f"gamma = {table.gamma(window_size):.4f} is implausible: {implausible[0]} ({table.describe()}). "
            f"Measure on a quieter machine ({REMEASURE_ENV}=1 re-measures) or give gamma as a number."
        )
    return table.gamma(window_size)


# -------------------------------------------------------------------------------------- online correction
@dataclass
class CostMonitor:
    """Compares the costs a decoding loop observes with those `table` prices, and corrects the table.

    Each round reports its drafting (drafter steps run, seconds including the commit) and its verification
    forward (tokens run, seconds), timed with `cost_clock`. Only the table's *relative* prices decide windows,
    so the test is on rho_draft / rho_verify, where rho = observed seconds / priced seconds summed over the
    last `history` rounds (drafting rounds only for rho_draft). When it leaves [1/(1+margin), 1+margin] at
    `patience` consecutive drafting rounds, after at least `min_rounds` of them, the table is replaced by one
    scaled to the observations (`source="observed"`; verification entries scaled together, so their shape
    is kept), the cached copy is marked stale (the next process re-measures) and `on_correct` is called.
    Once corrected, the observed table is refined with the tighter `refine_margin` (the first observations
    are mostly one-step probes, which overstate a step's share of the round). `corrected_at` lists the
    round index of each correction; `disagreement` is the last ratio judged. The default margin (3x) leaves
    room for what the table does not time (the policy's own bookkeeping) and catches what matters: a table
    from a disturbed measurement is off by 5-20x."""

    table: CostTable
    margin: float = 2.0
    refine_margin: float = 0.25
    patience: int = 2
    min_rounds: int = 3
    history: int = 32
    on_correct: Callable[[CostTable], None] | None = None
    rounds: int = field(default=0, init=False)
    disagreement: float | None = field(default=None, init=False)
    corrected_at: list[int] = field(default_factory=list, init=False)
    _draft: deque = field(default_factory=deque, init=False)
    _verify: deque = field(default_factory=deque, init=False)
    _strikes: int = field(default=0, init=False)

    def _fit_drafting(self, commit_guess: float) -> tuple[float, float]:
        """(seconds per drafter step, seconds per drafting round) from the observed rounds: a least-squares
        line through (steps, seconds) when the rounds drafted different numbers of steps; else (early on, when
        the rounds are one-step probes) the round's fixed part is `commit_guess` (the table's commit at the
        observed verification scale: what goes wrong in a disturbed table is the drafter's step) and the
        rest is the step."""
        seconds = [o for o, _, _ in self._draft]
        steps = [k for _, _, k in self._draft]
        mean_s, mean_k = sum(seconds) / len(seconds), sum(steps) / len(steps)
        spread = sum((k - mean_k) ** 2 for k in steps)
        if spread > 0:
            slope = sum((k - mean_k) * (o - mean_s) for k, o in zip(steps, seconds)) / spread
            fixed = mean_s - slope * mean_k
            if slope > 0 and fixed >= 0:
                return slope, fixed
        fixed = min(commit_guess, 0.5 * mean_s)
        return (mean_s - fixed) / mean_k, fixed

    def record(
        self, draft_steps: int, draft_seconds: float, verify_tokens: int, verify_seconds: float
    ) -> bool:
        """Report one round (`draft_steps` 0: no drafting observed); True when it corrected the table."""
        self.rounds += 1
        table = self.table
        self._verify.append((verify_seconds, table.c(verify_tokens)))
        if len(self._verify) > self.history:
            self._verify.popleft()
        if draft_steps <= 0:
            return False
        self._draft.append((draft_seconds, table.commit + draft_steps * table.draft_step, draft_steps))
        if len(self._draft) > self.history:
            self._draft.popleft()
        priced_draft = sum(p for _, p, _ in self._draft)
        if len(self._draft) < self.min_rounds or priced_draft <= 0:
            return False
        rho_draft = sum(o for o, _, _ in self._draft) / priced_draft
        rho_verify = sum(o for o, _ in self._verify) / sum(p for _, p in self._verify)
        disagreement = self.disagreement = rho_draft / rho_verify
        margin = self.refine_margin if table.source == "observed" else self.margin
        if 1 / (1 + margin) <= disagreement <= 1 + margin:
            self._strikes = 0
            return False
        self._strikes += 1
        if self._strikes < self.patience:
            return False
        step, commit = self._fit_drafting(table.commit * rho_verify)
        corrected = replace(
            table, verify=[v * rho_verify for v in table.verify], draft_step=step, commit=commit,
            source="observed", problems=[], stale="",
        )  # fmt: skip
        reason = (
            f"decoding observed drafting at {disagreement:.2f}x the price the table gives it relative to "
            f"verification ({len(self._draft)} drafting rounds, {len(self._verify)} forwards)"
        )
        if table.source == "observed":
            logger.info("Cost table refined from decoding: %s", reason)
        else:
            logger.warning("Cost table %s disagrees with decoding: %s; now using %s", table.key or "(given)",
                           reason, corrected.describe())  # fmt: skip
        mark_stale(table, reason, corrected)
        self.table = corrected
        self.corrected_at.append(self.rounds)
        self._draft.clear()
        self._verify.clear()
        self._strikes = 0
        if self.on_correct is not None:
            self.on_correct(corrected)
        return True
