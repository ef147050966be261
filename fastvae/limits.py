"""Size checks before allocating: a request that cannot fit in memory gets one clear line, not an
allocator traceback or minutes of swapping."""

from __future__ import annotations

import os

from fastvae.errors import FastVAEError


def available_bytes() -> int:
    """Memory this process may still take: MemAvailable from /proc/meminfo, else physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 40


def free_bytes(device=None) -> int:
    """Memory free now: on ``device`` if it is a CUDA device, else this process's (:func:`available_bytes`)."""
    if device is not None and getattr(device, "type", device) == "cuda":
        import torch

        return torch.cuda.mem_get_info(device)[0]
    return available_bytes()


def human_bytes(n: float) -> str:
    """A byte count for a message: "512 B", "1.5 GB"."""
    return _human(n)


def check_fits(nbytes: int, what: str, hint: str = "", device=None) -> None:
    """Raise FastVAEError when ``nbytes`` exceed the memory available now (on ``device`` if CUDA)."""
    free = free_bytes(device)
    if nbytes > free:
        extra = f"; {hint}" if hint else ""
        raise FastVAEError(
            f"{what} needs about {_human(nbytes)}, more than the {_human(free)} available{extra}"
        )


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if n < 1024 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PB"


# Importance samples K of an exported scorer (``fastvae export --part scorer --iw K``): its graph takes a
# row's K draws as one input and decodes them in one call, so K bounds that call's memory (16,384 draws of
# a 784-pixel decoder: about 50 MB per activation), and the export's check against PyTorch stays minutes.
# The IWAE paper's NLL uses K = 5,000; ``fastvae eval --iw`` (no such graph) goes further.
MAX_SCORER_IW = 16_384

# eval's importance samples when none are given (``fastvae.workflows.default_iw``): the IWAE paper's 5,000 on
# a GPU; on a CPU 500, since k = 5000 over 10,000 test images took ~23 min on a 2-core CPU.
IW_DEFAULT_GPU, IW_DEFAULT_CPU = 5000, 500
