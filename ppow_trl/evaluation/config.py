"""Settings of one drafter evaluation (`EvaluationConfig`, every field a flag of recipes/evaluate_drafter.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ppow_trl.decoding.hf import CHAIN_ROUND, METHODS
from ppow_trl.decoding.speculative import check_num_draft_tokens
from ppow_trl.training.acceptance import DEFAULT_TREE_WIDTH, DEFAULT_TREE_WINDOW

BASELINES = ("plain", "prompt_lookup")


@dataclass
class EvaluationConfig:
    """Settings of one drafter evaluation (every field is a command-line flag of recipes/evaluate_drafter.py)."""

    drafter: str = field(
        metadata={"help": "Drafter to evaluate: a local directory saved with save_pretrained, or a Hub id."},
    )
    target: str | None = field(
        default=None,
        metadata={
            "help": "Target model: 'embedded', a model directory, a .gguf file or a Hub id. Default: the "
            "drafter config's target_name_or_path, else 'embedded'."
        },
    )
    prompt_sets: list[str] = field(
        default_factory=lambda: ["mt_bench", "humaneval"],
        metadata={
            "help": "Prompt sets: mt_bench (both turns; turn 2 follows the target's own turn-1 answer), "
            "humaneval, gsm8k (Hub, needs network or cache), a .jsonl/.json/.parquet path, or "
            "split:<path to split.json> for the eval split of a training run."
        },
    )
    max_prompts: int | None = field(
        default=8, metadata={"help": "Prompts per set (the first N; None = all)."}
    )
    max_turns: int | None = field(
        default=2, metadata={"help": "User turns per conversation at most (None = all)."}
    )
    max_new_tokens: int = field(default=64, metadata={"help": "Tokens generated per turn at most."})
    num_draft_tokens: str = field(
        default="auto",
        metadata={
            "help": "Draft tokens per verification window (chain drafting): an integer K, or 'auto' (each round "
            "drafts while the drafter's confidence pays for the window's measured verification cost, up to 8, "
            "and may verify a plain step; docs/metrics.md)."
        },
    )
    prompt_lookup_num_tokens: list[int] = field(
        default_factory=lambda: [1, 2, 3, 4, 5],
        metadata={
            "help": "Windows K of the prompt_lookup baseline: each runs, and each prompt set reports the best, "
            "the free method a user would otherwise tune."
        },
    )
    prompt_lookup_tokens: int | None = field(
        default=None,
        metadata={
            "help": "Greedy, method loop or auto: up to this many tokens of prompt lookup join each round's "
            "draft tree as one more branch (ppow_trl.decoding.lookup); 0 = off; unset = generate's greedy default "
            "(ppow_trl.decoding.hf.GREEDY_ROUND)."
        },
    )
    teacher_forced_window: int = field(
        default=5,
        metadata={
            "help": "K of the teacher-forced greedy chain tau over the target's own greedy answers to the prompts "
            "(the drafter proposes K tokens at every answer position; what real decoding would accept at a fixed "
            "K on the same text); 0 = off."
        },
    )
    teacher_forced_tree_width: int = field(
        default=DEFAULT_TREE_WIDTH,
        metadata={
            "help": "Width w of the teacher-forced tree tau over the same answers: a depth of the window is accepted "
            "while the target's token is among the drafter's top-w there (docs/metrics.md); 1 = chain."
        },
    )
    teacher_forced_tree_window: int = field(
        default=DEFAULT_TREE_WINDOW,
        metadata={
            "help": "Depths K of the teacher-forced tree tau (at most a Medusa drafter's heads); 0 = off."
        },
    )
    temperatures: list[float] = field(
        default_factory=lambda: [0.0],
        metadata={"help": "Decoding temperatures; 0 = greedy (with the lossless check), e.g. 0 1."},
    )
    dtype: str = field(
        default="float32",
        metadata={
            "help": "Target and drafter dtype (float32, bfloat16, float16); lossless checks need float32."
        },
    )
    seed: int = field(default=0, metadata={"help": "Random seed (sampling at temperature > 0)."})
    output_dir: str = field(
        default="outputs/evaluation",
        metadata={"help": "Where results.json, results.md and plots are written."},
    )
    baselines: list[str] = field(
        default_factory=lambda: ["plain"],
        metadata={
            "help": "Extra rows: 'plain' (plain generate on its own) and/or 'prompt_lookup' "
            "(transformers' prompt-lookup decoding with K tokens)."
        },
    )
    method: str = field(
        default="auto",
        metadata={
            "help": "Speculative decoding path (generate's `method`): 'assisted' (transformers' assisted generation with the "
            "drafter's candidate generator), 'loop' (ppow_trl's batched decoding loop at batch size 1) or 'auto' "
            "(generate's choice: the loop for greedy rows, assisted for sampling)."
        },
    )
    draft_tree_width: int | None = field(
        default=None,
        metadata={
            "help": "1 = chain drafting; w > 1 = a dynamic draft tree: each layer expands the w most probable "
            "nodes into their w best children, and the round verifies the best nodes by path probability "
            "(greedy, method: loop or auto); unset = generate's greedy default (ppow_trl.decoding.hf.GREEDY_ROUND)."
        },
    )
    warmup_tokens: int = field(
        default=8, metadata={"help": "Tokens generated by each method once before timing (0 = no warm-up)."}
    )
    remeasure_costs: bool = field(
        default=False,
        metadata={
            "help": "Measure the decoding cost table again before timing (num_draft_tokens auto) instead of "
            "reading the cached one; PPOW_TRL_REMEASURE_COSTS=1 does the same for any run."
        },
    )
    device: str | None = field(
        default=None, metadata={"help": "Device for target and drafter (default: CPU)."}
    )
    progress: bool = field(default=True, metadata={"help": "Show a progress bar over prompts."})
    plots: bool = field(default=True, metadata={"help": "Write the PNG plots."})

    def __post_init__(self):
        if isinstance(self.prompt_sets, str):
            self.prompt_sets = [self.prompt_sets]
        if isinstance(self.baselines, str):
            self.baselines = [self.baselines]
        if isinstance(self.temperatures, int | float):
            self.temperatures = [float(self.temperatures)]
        if not self.drafter:
            raise ValueError("EvaluationConfig.drafter is required (a drafter directory or Hub id)")
        if isinstance(self.num_draft_tokens, str) and self.num_draft_tokens.strip().isdigit():
            self.num_draft_tokens = int(self.num_draft_tokens)
        self.num_draft_tokens = check_num_draft_tokens(self.num_draft_tokens)
        if isinstance(self.prompt_lookup_num_tokens, int):
            self.prompt_lookup_num_tokens = [self.prompt_lookup_num_tokens]
        if not self.prompt_lookup_num_tokens or min(self.prompt_lookup_num_tokens) < 1:
            raise ValueError(
                f"prompt_lookup_num_tokens must be integers >= 1, got {self.prompt_lookup_num_tokens}"
            )
        greedy_tree = self.method != "assisted" and not any(t > 0 for t in self.temperatures)
        if self.prompt_lookup_tokens is not None:
            if self.prompt_lookup_tokens < 0:
                raise ValueError(f"prompt_lookup_tokens must be >= 0, got {self.prompt_lookup_tokens}")
            if self.prompt_lookup_tokens and not greedy_tree:
                raise ValueError(
                    "prompt_lookup_tokens > 0 (lookup branches) needs method: loop or auto and temperatures: [0]"
                )
        if self.draft_tree_width is not None:
            if self.draft_tree_width < 1:
                raise ValueError(f"draft_tree_width must be >= 1, got {self.draft_tree_width}")
            if self.draft_tree_width > 1 and not greedy_tree:
                raise ValueError(
                    "draft trees (draft_tree_width > 1) need method: loop or auto and temperatures: [0]"
                )
        if self.teacher_forced_window < 0:
            raise ValueError(f"teacher_forced_window must be >= 0, got {self.teacher_forced_window}")
        if self.teacher_forced_tree_width < 1:
            raise ValueError(f"teacher_forced_tree_width must be >= 1, got {self.teacher_forced_tree_width}")
        if self.teacher_forced_tree_window < 0:
            raise ValueError(
                f"teacher_forced_tree_window must be >= 0, got {self.teacher_forced_tree_window}"
            )
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.prompt_sets:
            raise ValueError("prompt_sets is empty")
        if any(t < 0 for t in self.temperatures) or not self.temperatures:
            raise ValueError(f"temperatures must be >= 0 (0 = greedy), got {self.temperatures}")
        unknown = [b for b in self.baselines if b not in BASELINES]
        if unknown:
            raise ValueError(f"unknown baselines {unknown}; choose from {BASELINES}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.max_prompts is not None and self.max_prompts < 1:
            raise ValueError(f"max_prompts must be >= 1 or None, got {self.max_prompts}")

    def round_options(self) -> dict[str, int]:
        """The tree and lookup options this config names (`generate` chooses the others, `decoding_round`)."""
        return {name: getattr(self, name) for name in CHAIN_ROUND if getattr(self, name) is not None}
