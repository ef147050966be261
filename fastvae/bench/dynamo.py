"""What torch.compile really did in a bench cell, from ``torch._dynamo.utils.counters``.

A compile cell can silently run eager: a frame dynamo cannot trace is skipped (run eagerly), and past
``recompile_limit`` (8) recompiles a frame runs eagerly for good. The bench resets dynamo before every
cell and reads the counters after the warm-up steps (everything compiled) and after the timed steps:

- ``graphs``: FX graphs compiled (1 would be the whole step in one graph);
- ``graph_breaks`` and their kinds (``break_reasons``, first line of each);
- ``fallbacks``: frames dynamo gave up on (they run eager), recompile-limit hits included;
- ``recompiles``: graphs compiled during the timed steps (identical steps should compile none);
  ``frames``: frames dynamo was called on, skipped ones (its own and torch's internals) included.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


def reset() -> None:
    """A fresh dynamo for the next cell: no cached frames, no guards from earlier cells, zeroed counters."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()


@dataclass
class DynamoStats:
    graphs: int = 0
    graph_breaks: int = 0
    fallbacks: int = 0
    recompiles: int = 0
    frames: int = 0
    break_reasons: list[str] = field(default_factory=list)
    fallback_reasons: list[str] = field(default_factory=list)

    @property
    def flagged(self) -> bool:
        """True when the cell is not compiled as the step must be (see :func:`unexpected`)."""
        return unexpected(asdict(self))

    @property
    def fell_back(self) -> bool:
        """True when some of the step ran eager because dynamo gave up (or recompiled)."""
        return self.fallbacks > 0 or self.recompiles > 0 or self.graphs == 0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "flagged": self.flagged, "fell_back": self.fell_back}

    def label(self) -> str:
        """Short table label: graphs and breaks, and FALLBACK/RECOMPILED when it happened."""
        parts = [f"{self.graphs} graph{'s' if self.graphs != 1 else ''}"]
        if self.graph_breaks:
            parts.append(f"{self.graph_breaks} breaks")
        if self.fallbacks:
            parts.append(f"FELL BACK x{self.fallbacks}")
        if self.recompiles:
            parts.append(f"RECOMPILED x{self.recompiles}")
        return ", ".join(parts)


# The whole step compiles to 2 graphs by design of PyTorch, not by a fault of the step: dynamo does not
# trace ``Tensor.backward()`` (a graph break: graph 1 is the forward and the loss), and ``Optimizer.step``
# calls ``torch._dynamo.graph_break()`` on entry and exit so that AOT sees its no_grad region (graph 2 is
# Adam; torch/optim/optimizer.py, pytorch issue 104053). The CPU records show exactly this: 2 graphs, 3
# breaks of these two kinds, no fallback, no recompile.
EXPECTED_GRAPHS = 2
EXPECTED_BREAKS = ("Unsupported Tensor.backward() call", "Call to `torch._dynamo.graph_break()`")


def unexpected(d: dict[str, Any]) -> bool:
    """True when a compile cell is not what the step compiles to: more graphs than EXPECTED_GRAPHS (or
    none), a break of another kind, a frame that fell back to eager, or a recompile while timed."""
    odd_breaks = any(r not in EXPECTED_BREAKS for r in d.get("break_reasons", []))
    graphs = d["graphs"]
    return graphs == 0 or graphs > EXPECTED_GRAPHS or odd_breaks or d["fallbacks"] > 0 or d["recompiles"] > 0


# While inductor compiles (bf16 autocast on the CPU, seen with torch 2.13), dynamo is also called on
# frames of its own machinery (torch.fx codegen, inspect.signature) and reports their generator
# expressions as "Attempt to trace generator". The step has no generator frames (ReferenceVAE, WholeStep
# and Adam's foreach step contain none), so such a skip cannot be part of the step running eager.
INTERNAL_SKIPS = ("Attempt to trace generator",)


def _internal(msg: str) -> bool:
    return _first_line(msg) in INTERNAL_SKIPS


def _first_line(msg: str) -> str:
    return str(msg).strip().splitlines()[0][:120] if str(msg).strip() else "?"


def snapshot() -> dict[str, Any]:
    """The counters that matter, copied (they keep changing)."""
    from torch._dynamo.utils import counters

    return {
        "frames": counters["frames"]["total"],
        "graphs": counters["stats"]["unique_graphs"],
        "breaks": dict(counters["graph_break"]),
        "unimplemented": dict(counters["unimplemented"]),
    }


def stats(after_warmup: dict[str, Any], after_all: dict[str, Any]) -> DynamoStats:
    """DynamoStats from a snapshot after the warm-up (compiling) steps and one after the timed steps."""
    # "unimplemented" holds the reasons a frame was skipped, recompile-limit hits among them; a break
    # that dynamo recovered from by splitting the graph is in "graph_break" instead.
    skipped = {k: n for k, n in after_all["unimplemented"].items() if not _internal(k)}
    return DynamoStats(
        graphs=after_all["graphs"],
        graph_breaks=sum(after_all["breaks"].values()),
        fallbacks=sum(skipped.values()),
        recompiles=after_all["graphs"] - after_warmup["graphs"],  # a recompile makes a new graph
        frames=after_all["frames"],
        break_reasons=sorted({_first_line(k) for k in after_all["breaks"]}),
        fallback_reasons=sorted({_first_line(k) for k in skipped}),
    )
