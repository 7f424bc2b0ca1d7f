"""Show the results: a progress bar while measuring, a terminal table, a plot."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, TextIO

COLUMNS = (
    ("system", "<"),
    ("payload", "<"),
    ("w", ">"),
    ("touch", "<"),
    ("items/s", ">"),
    ("GB/s", ">"),
    ("startup ms", ">"),
    ("peak RSS MB", ">"),
    ("CPU us/item", ">"),
    ("x tensorpack", ">"),
    ("x memcpy", ">"),
)


class Progress:
    """A one-line progress bar on a terminal; one line per row elsewhere (logs, CI)."""

    def __init__(self, stream: TextIO = sys.stderr, width: int = 30):
        self.stream = stream
        self.width = width
        self.tty = stream.isatty()

    def __call__(self, done: int, total: int, row: dict[str, Any]) -> None:
        what = (
            f"{row['label']} {row['payload']} w={row['workers']}{' touch' if row['touch'] else ''}"
            if row
            else "done"
        )
        if self.tty:
            filled = self.width * done // max(total, 1)
            bar = "#" * filled + "-" * (self.width - filled)
            end = "\n" if done == total else ""
            self.stream.write(f"\r\x1b[K[{bar}] {done}/{total} {what}{end}")
        elif row:
            self.stream.write(f"[{done + 1}/{total}] {what}\n")
        self.stream.flush()


def _num(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def cells(row: dict[str, Any]) -> list[str]:
    """One table line: the row's numbers formatted, or its status."""
    head = [row["label"], row["payload"], "-" if row["system"] == "memcpy" else str(row["workers"])]
    head.append("yes" if row["touch"] else "")
    if row.get("status") != "ok":
        return [*head, row.get("status", "?"), *[""] * (len(COLUMNS) - 5)]
    startup = row.get("startup_s")
    cpu = row.get("cpu_s_per_item")
    ratio_tp = row.get("vs_counterpart")
    return [
        *head,
        _num(row["items_per_s"]),
        _num(row["gb_per_s"]),
        "-" if startup is None else _num(startup * 1000),
        _num(row.get("peak_rss_mb")),
        "-" if cpu is None else _num(cpu * 1e6),
        "-" if ratio_tp is None else f"{ratio_tp:.2f}",
        "-" if row.get("vs_memcpy") is None else f"{row['vs_memcpy']:.3f}",
    ]


def table(rows: Sequence[dict[str, Any]]) -> str:
    """The results as a plain-text table (a status such as "not installed" spans the row)."""
    lines = [cells(r) for r in rows]
    headers = [name for name, _ in COLUMNS]
    ok = [line for line, r in zip(lines, rows, strict=True) if r.get("status") == "ok"] + [headers]
    widths = [max(len(line[i]) for line in ok) for i in range(len(COLUMNS))]
    widths[:4] = [max(len(line[i]) for line in [*lines, headers]) for i in range(4)]

    def fmt(line: list[str], status: bool = False) -> str:
        if status:
            return "  ".join(f"{line[i]:<{widths[i]}}" for i in range(4)) + "  " + line[4]
        return "  ".join(
            f"{cell:{align}{width}}"
            for cell, (_, align), width in zip(line, COLUMNS, widths, strict=True)
        ).rstrip()

    out = [fmt(headers), "  ".join("-" * w for w in widths)]
    previous = None
    for line, row in zip(lines, rows, strict=True):
        if previous is not None and row["payload"] != previous:
            out.append("")
        previous = row["payload"]
        out.append(fmt(line, status=row.get("status") != "ok"))
    return "\n".join(out)


def plot(rows: Sequence[dict[str, Any]], path: str) -> None:
    """Bar chart of GB/s per payload, one bar per system (log scale), saved to ``path``.

    :raises ImportError: matplotlib is not installed (``pip install 'flowplug[plot]'``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("status") == "ok"]
    groups = sorted({(r["workers"], r["touch"]) for r in ok if r["system"] != "memcpy"})
    payloads = list(dict.fromkeys(r["payload"] for r in ok))
    labels = list(dict.fromkeys(r["label"] for r in ok))
    fig, axes = plt.subplots(
        len(groups) or 1, 1, figsize=(12, 3.6 * max(len(groups), 1)), squeeze=False
    )
    width = 0.8 / max(len(labels), 1)
    for ax, (workers, touch) in zip(axes[:, 0], groups or [(1, False)], strict=False):
        for j, label in enumerate(labels):
            values = []
            for payload in payloads:
                match = [
                    r
                    for r in ok
                    if r["label"] == label
                    and r["payload"] == payload
                    and (r["system"] == "memcpy" or (r["workers"], r["touch"]) == (workers, touch))
                ]
                values.append(match[0]["gb_per_s"] if match else 0.0)
            xs = [i + (j - len(labels) / 2 + 0.5) * width for i in range(len(payloads))]
            ax.bar(xs, values, width, label=label)
        ax.set_xticks(range(len(payloads)), payloads)
        ax.set_yscale("log")
        ax.set_ylabel("GB/s")
        ax.set_title(f"{workers} worker(s){', consumer reads every byte' if touch else ''}")
    axes[0, 0].legend(fontsize="small", ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
