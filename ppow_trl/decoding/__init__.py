"""Decoding with a drafter: batched and chain drafting, verification (torch reference and Triton kernel),
the speculative decoding loop and its transformers integration, and the cost of a drafter pass.

Modules: `drafting` (draft windows), `verify` + `kernels` (accept or reject them), `speculative` (our
batched loop), `hf` (transformers' `generate`: candidate generator, `custom_generate` callables), `cost` (the
measured cost table c(n) + drafter step, shared with PPOW's gamma), `draft_length` (the per-round window:
`num_draft_tokens="auto"` or a confidence threshold), `packed` (verification forwards through oneDNN with
prepacked weights on CPU).
"""

from ppow_trl.packed import packed_linears

from .cost import CostTable, measure_costs
from .draft_length import DraftLengthPolicy
from .drafting import ChainDrafter, draft_windows, window_targets
from .hf import (
    DrafterCandidateGenerator,
    assisted_decoding_with_drafter,
    attach_drafter,
    detach_drafter,
    generate,
    speculative_decoding,
)
from .kernels import verify_windows
from .speculative import SpeculativeOutput, speculative_generate
from .verify import VerifyResult, verify_greedy, verify_sampling

__all__ = [
    "ChainDrafter",
    "CostTable",
    "DraftLengthPolicy",
    "DrafterCandidateGenerator",
    "SpeculativeOutput",
    "VerifyResult",
    "assisted_decoding_with_drafter",
    "attach_drafter",
    "detach_drafter",
    "draft_windows",
    "generate",
    "measure_costs",
    "packed_linears",
    "speculative_decoding",
    "speculative_generate",
    "verify_greedy",
    "verify_sampling",
    "verify_windows",
    "window_targets",
]
