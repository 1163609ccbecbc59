"""What a bench run found: rows (a summary or one value), ratios between rows, and the
targets of issue 7, printed as plain tables and saved as JSON (`--json FILE`).

Who runs this: the bench process. A row that could not be measured (a feature not built
yet) is kept with the reason, printed as "n/a (…)", and its targets say "n/a".
"""

from __future__ import annotations

import json
import platform
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchlib.samples import Summary

NA = "n/a (not available)"


@dataclass
class Row:
    key: str
    label: str
    summary: Summary | None = None
    value: float | None = None
    unit: str = "ms"
    note: str = ""
    missing: str = ""           # why there is no number

    def median(self) -> float | None:
        return self.summary.median if self.summary else self.value


@dataclass
class Target:
    label: str
    key: str
    limit: float
    kind: str = "<="               # "<=" or ">="
    stat: str = "median"
    over: str | None = None        # a ratio target: key / over <= limit


@dataclass
class Report:
    sections: dict[str, list[Row]] = field(default_factory=dict)
    ratios: list[tuple[str, str, str]] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    facts: dict[str, object] = field(default_factory=dict)
    started: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        self.facts["load_start"] = load_average()

    def add(self, section: str, key: str, label: str, summary: Summary | None = None, *,
            value: float | None = None, unit: str = "ms", note: str = "", missing: str = "") -> Row:
        row = Row(key, label, summary, value, unit, note, missing)
        self.sections.setdefault(section, []).append(row)
        return row

    def na(self, section: str, key: str, label: str, why: str = NA) -> Row:
        return self.add(section, key, label, missing=why)

    def row(self, key: str) -> Row | None:
        for rows in self.sections.values():
            for r in rows:
                if r.key == key:
                    return r
        return None

    def value(self, key: str, stat: str = "median") -> float | None:
        r = self.row(key)
        if r is None or r.missing:
            return None
        if r.summary is not None:
            return getattr(r.summary, stat)
        return r.value

    def ratio(self, label: str, key: str, over: str) -> None:
        self.ratios.append((label, key, over))

    # --------------------------------------------------------------- printing
    def render(self) -> str:
        out = [f"Sandkasten bench — {time.strftime('%Y-%m-%d %H:%M', time.localtime(self.started))}, "
               f"{machine()}", f"load average at start {self.facts.get('load_start', '?')}, "
               f"at end {load_average()} (other work on the host skews absolute times; compare ratios)"]
        for section, rows in self.sections.items():
            out.append("")
            out.append(f"## {section}")
            out.append(f"{'':44} {'min':>10} {'median':>10} {'p99':>10} {'n':>6}  note")
            for r in rows:
                if r.missing:
                    out.append(f"{r.label:44} {r.missing}")
                elif r.summary is not None:
                    s = r.summary
                    out.append(f"{r.label:44} {fmt(s.min):>10} {fmt(s.median):>10} {fmt(s.p99):>10} "
                               f"{s.n:>6}  {r.unit}{'; ' + r.note if r.note else ''}")
                else:
                    out.append(f"{r.label:44} {'':>10} {fmt(r.value):>10} {'':>10} {'':>6}  "
                               f"{r.unit}{'; ' + r.note if r.note else ''}")
        shown = [r for r in self.ratios if self.row(r[1]) is not None or self.row(r[2]) is not None]
        if shown:   # a ratio whose two sides were not selected in this run is left out
            out += ["", "## ratios (medians)"]
            for label, key, over in shown:
                a, b = self.value(key), self.value(over)
                text = f"{a / b:.2f}x" if a is not None and b else NA
                out.append(f"{label:60} {text}")
        if self.verdicts():
            out += ["", "## targets (issue 12)"]
            for t, verdict, got in self.verdicts():
                out.append(f"{t.label:60} {got:>14}  {verdict}")
        return "\n".join(out)

    def verdicts(self) -> list[tuple[Target, str, str]]:
        found = []
        for t in self.targets:
            if self.row(t.key) is None:
                continue   # not selected in this run
            v = self.value(t.key, t.stat)
            if t.over is not None:
                b = self.value(t.over, t.stat)
                v = v / b if v is not None and b else None
            if v is None:
                found.append((t, "n/a", "n/a"))
                continue
            ok = v <= t.limit if t.kind == "<=" else v >= t.limit
            unit = "x" if t.over else ""
            found.append((t, "met" if ok else "MISSED", f"{fmt(v)}{unit}"))
        return found

    def to_json(self) -> dict:
        return {
            "started": self.started, "machine": machine(), "facts": self.facts, "load_end": load_average(),
            "sections": {s: [{"key": r.key, "label": r.label, "unit": r.unit, "note": r.note,
                              "missing": r.missing or None, "value": r.value,
                              "summary": r.summary.to_json() if r.summary else None} for r in rows]
                         for s, rows in self.sections.items()},
            "targets": [{"label": t.label, "verdict": v, "got": g} for t, v, g in self.verdicts()],
        }

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n")


def fmt(v: float | None) -> str:
    if v is None:
        return "-"
    if v >= 1000:
        return f"{v:,.0f}"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    if v >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def load_average() -> str:
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "?"


def machine() -> str:
    cpu = "unknown cpu"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
        with open("/proc/meminfo") as f:
            mem_kb = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
    except (OSError, StopIteration, ValueError):
        mem_kb = 0
    import os
    return (f"{os.cpu_count()} cores {cpu}, {mem_kb / 1048576:.0f} GB RAM, Linux {platform.release()}, "
            f"Python {platform.python_version()}")


def git_head(repo: Path) -> str:
    try:
        return subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "?"
