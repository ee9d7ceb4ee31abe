"""Decoding with a drafter: batched and chain drafting, verification (torch reference and Triton kernel),
the speculative decoding loop and its transformers integration, and the cost of a drafter pass.

Modules: `drafting` (draft windows), `verify` + `kernels` (accept or reject them), `speculative` (our
batched loop), `hf` (transformers' `generate`: candidate generator, `custom_generate` callables), `cost`.
"""

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
    "DrafterCandidateGenerator",
    "SpeculativeOutput",
    "VerifyResult",
    "assisted_decoding_with_drafter",
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
