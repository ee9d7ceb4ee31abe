"""Decoding with a drafter: batched and chain drafting, verification (torch reference and Triton kernel),
the speculative decoding loop and its transformers hooks, and the cost of a drafter pass."""

from .drafting import ChainDrafter, DraftWindows, draft_windows, window_targets
from .kernels import verify_windows
from .speculative import (
    DrafterCandidateGenerator,
    SpeculativeOutput,
    attach_drafter,
    detach_drafter,
    generate,
    speculative_decoding,
    speculative_generate,
)
from .verify import VerifyResult, verify_greedy, verify_sampling

__all__ = [
    "ChainDrafter",
    "DraftWindows",
    "DrafterCandidateGenerator",
    "SpeculativeOutput",
    "VerifyResult",
    "attach_drafter",
    "detach_drafter",
    "draft_windows",
    "generate",
    "speculative_decoding",
    "speculative_generate",
    "verify_greedy",
    "verify_sampling",
    "verify_windows",
    "window_targets",
]
