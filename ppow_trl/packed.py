"""Verification forwards near their cost floor on CPU: the target's linear layers through oneDNN with
prepacked weights.

A verification forward multiplies a few rows (the K+1 window tokens) by every weight matrix. On CPU the
default fp32 matmul (MKL sgemm) repacks the weight matrix on every call once there are more than one or two
rows, so a 6-token forward of SmolLM2-135M costs ~1.7-1.9 one-token forwards although the weights are read
once either way (`benchmarks/RESULTS_verify_cost.md`). oneDNN's inner product with a weight packed once
in its blocked layout has no such step: the same forward costs ~1.1 one-token forwards, and a one-token
forward costs what it did.

`packed_linears(model)` is a context manager that routes every `nn.Linear` of `model` through oneDNN with
its weight packed once (cached on the module; repacked if the weight changes). Outputs differ from the
default path by fp32 rounding only. It applies only where it helps and is exact to fp32 rounding: CPU
tensors, float32, no autograd; elsewhere (CUDA, other dtypes, training, a torch build without oneDNN) it is
a no-op. The packed copies double the memory of the weights, so `use_packed_linears` (what the decoding
loops call) enables it by default only for targets whose linear weights take at most
`DEFAULT_MAX_PACKED_BYTES`.

The packing uses two private torch operators (through `ppow_trl._compat`; what torch.compile's CPU
freezing emits); if they are missing or fail once, the default path is used. Used by decoding (verification)
and by the data stage (batched regeneration), hence its place beside `target.py`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from ppow_trl._compat import mkldnn_pack_linear_weight, mkldnn_packed_linear, mkldnn_packed_linear_available

__all__ = ["DEFAULT_MAX_PACKED_BYTES", "packed_linears", "packing_supported", "use_packed_linears"]

DEFAULT_MAX_PACKED_BYTES = 2 * 1024**3
_PACK_BATCH_HINT = 16
_ATTR = "_ppow_packed_weight"
_state = {"broken": False}


def packing_supported(model: torch.nn.Module) -> bool:
    """True where packing applies: a CPU float32 model and a torch build with oneDNN's packed linear."""
    if _state["broken"] or not torch.backends.mkldnn.is_available():
        return False
    if not mkldnn_packed_linear_available():
        return False
    try:
        param = next(model.parameters())
    except StopIteration:
        return False
    return param.device.type == "cpu" and param.dtype == torch.float32


def _linear_bytes(model: torch.nn.Module) -> int:
    return sum(
        m.weight.numel() * m.weight.element_size() for m in model.modules() if type(m) is torch.nn.Linear
    )


def use_packed_linears(model: torch.nn.Module, enabled: bool | str = "auto") -> bool:
    """Whether a decoding loop should run `model` under `packed_linears`: `enabled` True/False, or "auto"
    (supported here and the packed copies take at most `DEFAULT_MAX_PACKED_BYTES`)."""
    if enabled not in (True, False, "auto"):
        raise ValueError(f"packed linears must be True, False or 'auto', got {enabled!r}")
    if enabled is False or not packing_supported(model):
        return False
    return enabled is True or _linear_bytes(model) <= DEFAULT_MAX_PACKED_BYTES


def _packed_weight(module: torch.nn.Linear) -> torch.Tensor:
    weight = module.weight
    key = (weight.data_ptr(), weight._version, tuple(weight.shape))
    cached = module.__dict__.get(_ATTR)
    if cached is None or cached[0] != key:
        cached = (key, mkldnn_pack_linear_weight(weight.detach(), _PACK_BATCH_HINT))
        module.__dict__[_ATTR] = cached
    return cached[1]


def _packed_forward(module: torch.nn.Linear):
    default = type(module).forward.__get__(module)

    def forward(x: torch.Tensor) -> torch.Tensor:
        if _state["broken"] or x.dtype != torch.float32 or x.device.type != "cpu" or torch.is_grad_enabled():
            return default(x)
        try:
            flat = x.reshape(-1, x.shape[-1])
            bias = None if module.bias is None else module.bias.detach()
            out = mkldnn_packed_linear(flat, _packed_weight(module), bias)
        except (RuntimeError, AttributeError):  # an unsupported build or shape: the default path from now on
            _state["broken"] = True
            return default(x)
        return out.view(*x.shape[:-1], out.shape[-1])

    return forward


@contextlib.contextmanager
def packed_linears(model: torch.nn.Module, enabled: bool = True) -> Iterator[torch.nn.Module]:
    """Run `model`'s `nn.Linear` layers through oneDNN with prepacked weights inside the block (see the
    module docstring); a no-op when `enabled` is False or packing does not apply to `model`."""
    if not enabled or not packing_supported(model):
        yield model
        return
    patched = []
    try:
        for module in model.modules():
            if type(module) is torch.nn.Linear and "forward" not in module.__dict__:
                module.forward = _packed_forward(module)
                patched.append(module)
        yield model
    finally:
        for module in patched:
            module.__dict__.pop("forward", None)
