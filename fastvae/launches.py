"""Count the GPU kernels a piece of work would launch, traced on any device (no GPU, no profiler needed).

Two sources are recorded while ``fn`` runs:

- every aten operator, through a ``TorchDispatchMode`` (forward, autograd's backward and the optimizer
  all dispatch through it); operators that only make views or allocate (``view``, ``t``, ``empty``, …)
  launch nothing on a GPU and are not counted;
- every Triton launch, by wrapping ``run`` of Triton's compiled and interpreted kernel classes, so the
  count comes from the launches themselves, not from a counter the launch sites keep.

One aten operator is counted as one kernel. That is what CUDA does for the operators a training step
uses, with known exceptions that this trace cannot see: a ``_foreach``/fused optimizer operator issues one
kernel per chunk of at most a few hundred thread blocks (one chunk for models of a few million
parameters), and cuBLAS may add a split-K reduction kernel to a matmul. On a GPU, ``torch.profiler``
gives the measured count; this module gives the traced one, and reports label it so.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

# Operators that produce views, metadata or uninitialised storage: no kernel on any device.
NO_KERNEL = frozenset(
    {
        "view", "_unsafe_view", "as_strided", "alias", "detach", "t", "transpose", "permute", "expand",
        "unsqueeze", "squeeze", "slice", "select", "split", "split_with_sizes", "chunk", "unbind",
        "reshape", "flatten", "unflatten", "view_as", "expand_as", "narrow", "diagonal", "_reshape_alias",
        "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "resize_",
        "lift_fresh", "set_", "is_same_size", "_to_copy_noop", "result_type", "sym_size", "sym_stride",
        "sym_numel", "sym_storage_offset", "size", "stride", "dim", "is_nonzero", "_has_compatible_shallow_copy_type",
        "_record_function_enter", "_record_function_enter_new", "_record_function_exit",  # profiler marks
    }
)  # fmt: skip


@dataclass
class KernelTrace:
    """What one traced call launched: aten operators and Triton kernels, by name, in order."""

    aten: list[str] = field(default_factory=list)
    triton: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return len(self.aten) + len(self.triton)

    def summary(self) -> str:
        parts = Counter(self.aten) + Counter(f"triton:{k}" for k in self.triton)
        return f"{self.total} kernels (traced): " + ", ".join(
            f"{k} x{n}" if n > 1 else k for k, n in parts.items()
        )


class _AtenRecorder(TorchDispatchMode):
    def __init__(self, out: list[str]) -> None:
        super().__init__()
        self.out = out

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in NO_KERNEL:
            self.out.append(name)
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _triton_recorder(out: list[str]) -> Iterator[None]:
    """Wrap ``run`` of Triton's kernel classes (compiled and interpreted) for the duration."""
    try:
        from triton.runtime import interpreter, jit
    except ImportError:  # no Triton: nothing can launch one
        yield
        return
    classes = [jit.JITFunction, interpreter.InterpretedFunction]
    originals = [cls.run for cls in classes]

    def wrap(orig):
        def run(self, *args, **kwargs):
            if kwargs.get("warmup", False):
                return orig(self, *args, **kwargs)
            out.append(getattr(self, "__name__", None) or getattr(self.fn, "__name__", "kernel"))
            # The interpreter moves tensors with aten copies of its own: not the step's kernels.
            with _disable_current_modes():
                return orig(self, *args, **kwargs)

        return run

    for cls, orig in zip(classes, originals):
        cls.run = wrap(orig)
    try:
        yield
    finally:
        for cls, orig in zip(classes, originals):
            cls.run = orig


def trace_kernels(fn: Callable[[], object]) -> KernelTrace:
    """Run ``fn()`` once and return the kernels it would launch on a GPU (see the module docstring)."""
    trace = KernelTrace()
    with _triton_recorder(trace.triton), _AtenRecorder(trace.aten):
        fn()
    return trace


def profiled_kernels(fn: Callable[[], object], device: torch.device) -> int:
    """Kernels measured by ``torch.profiler`` on a CUDA device while ``fn()`` runs once."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize(device)
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
