"""Per-kernel profiles: what GRAPHC_PROFILE=1 and `executable.profile(*args)` report."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Sequence


@dataclass
class ProfileRow:
    name: str
    pattern: str
    seconds: float      # mean per graph call
    flops: int
    parts: list[tuple[str, float]]  # (function, mean seconds) for each call of the kernel
    modules: list[str] = field(default_factory=list)  # the module paths its ops came from

    @property
    def gflops(self) -> float:
        return self.flops / self.seconds / 1e9 if self.seconds > 0 else 0.0


@dataclass
class ProfileReport:
    graph: str
    rows: list[ProfileRow]
    calls: int

    @property
    def total_seconds(self) -> float:
        return sum(r.seconds for r in self.rows)

    def __str__(self) -> str:
        return self.table()

    def table(self, parts: bool = False) -> str:
        """One line per kernel, slowest first, with the module paths its ops came from; with
        `parts`, one more line per function it calls."""
        total = self.total_seconds or 1.0
        width = max([len(r.name) for r in self.rows] + [6])
        lines = [f"profile of {self.graph!r}: {len(self.rows)} kernels, mean of {self.calls} calls, "
                 f"{self.total_seconds * 1e3:.3f} ms in kernels",
                 f"{'kernel':<{width}}  {'pattern':<11} {'time us':>10} {'share':>6} "
                 f"{'MFLOP':>9} {'GFLOP/s':>8}  modules"]
        for r in sorted(self.rows, key=lambda r: -r.seconds):
            row = (f"{r.name:<{width}}  {r.pattern:<11} {r.seconds * 1e6:>10.1f} "
                   f"{r.seconds / total:>6.1%} {r.flops / 1e6:>9.3f} {r.gflops:>8.2f}  ")
            lines.append((row + ", ".join(r.modules)).rstrip())
            if parts and len(r.parts) > 1:
                lines.extend(f"  {entry:<{width - 2}}  {'':<11} {seconds * 1e6:>10.1f} "
                             f"{seconds / total:>6.1%}" for entry, seconds in r.parts)
        return "\n".join(lines)


def merged_report(graph: str, pieces: Sequence[tuple[str, ProfileReport, int]]) -> ProfileReport:
    """One report for a program run as pieces (the parts and scan bodies of a graph with scans):
    each (label, report, runs per program call) adds its rows, named `label.kernel`, with their
    times and FLOPs per program call (a scan body runs once per step)."""
    rows = [replace(r, name=f"{label}.{r.name}", seconds=r.seconds * runs, flops=r.flops * runs,
                    parts=[(entry, seconds * runs) for entry, seconds in r.parts])
            for label, report, runs in pieces for r in report.rows]
    calls = min((report.calls // runs for _, report, runs in pieces), default=0)
    return ProfileReport(graph, rows, calls)


__all__ = ["ProfileReport", "ProfileRow", "merged_report"]
