"""Benchmark results: figures with their floor, ratio and target, as a rich table or JSON.

A ``Figure`` is one measured value, the floor it is compared with (measured in
the same run), their ratio, and the target the ratio must meet (``>=`` or
``<=`` a threshold); figures without a target are informational. A figure
measured over several rounds carries the median of its per-round ratios as
``ratio`` and their range as ``spread`` (min, max), and says under what
conditions it was measured (``conditions``: transport, sizes, calls in
flight, rounds). A ``Report`` collects figures and free-form details from one
or more benchmarks.
"""

from __future__ import annotations

import math
import platform
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from rich.console import Console
from rich.table import Table


@dataclass
class Figure:
    key: str  # stable name for machines, e.g. "kernel.map_unmap"
    name: str  # for people
    value: float
    unit: str
    floor: float | None = None  # what the value is compared with
    floor_unit: str = ""
    floor_name: str = ""  # what the floor is
    ratio: float | None = None
    op: str | None = None  # ">=" or "<=" (the ratio's target); None: informational
    threshold: float | None = None
    target: str = ""  # the target in words
    note: str = ""
    spread: tuple[float, float] | None = None  # the per-round ratios' (min, max); ``ratio`` is their median
    conditions: str = ""  # what was measured how: transport, sizes, calls in flight, rounds x seconds

    @property
    def passed(self) -> bool | None:
        if self.op is None or self.threshold is None or self.ratio is None:
            return None
        if not math.isfinite(self.ratio):
            return False
        return self.ratio >= self.threshold if self.op == ">=" else self.ratio <= self.threshold

    @property
    def verdict(self) -> str:
        p = self.passed
        return "info" if p is None else ("PASS" if p else "MISS")

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        if self.spread is not None:
            d["spread"] = list(self.spread)
        d["passed"] = self.passed
        d["verdict"] = self.verdict
        return d


@dataclass
class Report:
    figures: list[Figure] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def add(self, fig: Figure) -> Figure:
        self.figures.append(fig)
        return fig

    def extend(self, other: "Report") -> None:
        self.figures.extend(other.figures)
        self.details.update(other.details)
        for k, v in other.meta.items():
            self.meta.setdefault(k, v)

    def figure(self, key: str) -> Figure:
        for f in self.figures:
            if f.key == key:
                return f
        raise KeyError(key)

    def to_json(self) -> dict[str, Any]:
        meta = {"python": platform.python_version(), "machine": platform.machine(),
                "cpus": _cpus(), "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **self.meta}
        return {"meta": meta, "figures": [f.to_json() for f in self.figures], "details": self.details,
                "missed": [f.key for f in self.figures if f.passed is False]}

    def render(self, console: Console | None = None, title: str = "mmsim bench") -> None:
        console = console or Console()
        t = Table(title=title, title_justify="left", show_lines=False)
        t.add_column("figure")
        t.add_column("measured", justify="right")
        t.add_column("floor", justify="right")
        t.add_column("ratio", justify="right")
        t.add_column("target")
        t.add_column("", justify="center")
        for f in self.figures:
            style = {"PASS": "green", "MISS": "bold red"}.get(f.verdict, "dim")
            floor = f"{fmt(f.floor)} {f.floor_unit}".strip() if f.floor is not None else "-"
            if f.floor_name and f.floor is not None:
                floor = f"{floor} ({f.floor_name})"
            ratio = fmt(f.ratio, ratio=True) if f.ratio is not None else "-"
            if f.spread is not None and f.ratio is not None:
                ratio += f"\n[dim]{fmt(f.spread[0], ratio=True)}..{fmt(f.spread[1], ratio=True)}[/dim]"
            name = f.name + "".join(f"\n[dim]{x}[/dim]" for x in (f.conditions, f.note) if x)
            t.add_row(name, f"{fmt(f.value)} {f.unit}".strip(), floor, ratio, f.target or "-",
                      f"[{style}]{f.verdict}[/{style}]")
        console.print(t)
        for line in self.meta.get("notes", []):
            console.print(f"[dim]{line}[/dim]")


def fmt(x: float | None, ratio: bool = False) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if ratio:
        return f"{x:.2f}"
    if isinstance(x, int):
        return f"{x:,}"
    ax = abs(x)
    if ax >= 1000:
        return f"{x:,.0f}"
    if ax >= 100:
        return f"{x:.0f}"
    if ax >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def _cpus() -> int:
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        return os.cpu_count() or 0
