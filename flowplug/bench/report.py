"""Show the results: a progress bar while measuring, a terminal table, a plot."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, TextIO

#: (heading, alignment, what it shows); "touch" is left out when no row has the consumer
#: read every byte.
COLUMNS = (
    ("system", "<", "the transport, peer or baseline"),
    ("payload", "<", "see `flowplug bench --help`"),
    ("w", ">", "workers"),
    ("touch", "<", "yes: the consumer read every byte of each item"),
    ("items/s", ">", "median of the rounds (each the median of its repeats)"),
    ("GB/s", ">", "items/s x payload bytes"),
    ("startup ms", ">", "construct to first item"),
    ("peak RSS MB", ">", "the consumer process"),
    ("CPU us/item", ">", "all processes of the row, per item"),
    ("consumer CPU us/item", ">", "the consumer process alone (its threads included)"),
    ("x tensorpack", ">", "items/s over the tensorpack runner it replaces"),
    ("x memcpy", ">", "GB/s over single-core memcpy of the same bytes"),
)


class Progress:
    """A one-line progress bar on a terminal; one line per row elsewhere (logs, CI)."""

    def __init__(self, stream: TextIO | None = None, width: int = 30):
        self.stream = sys.stderr if stream is None else stream
        self.width = width
        self.tty = self.stream.isatty()

    def __call__(
        self, done: int, total: int, row: dict[str, Any], round_: int = 1, rounds: int = 1
    ) -> None:
        what = (
            f"{row['label']} {row['payload']} w={row['workers']}{' touch' if row['touch'] else ''}"
            if row
            else "done"
        )
        where = f"{done + 1 if row else done}/{total}"
        if rounds > 1:
            where = f"round {round_}/{rounds} {where}"
        if self.tty:
            filled = self.width * ((round_ - 1) * total + done) // max(rounds * total, 1)
            bar = "#" * filled + "-" * (self.width - filled)
            end = "" if row else "\n"
            self.stream.write(f"\r\x1b[K[{bar}] {where} {what}{end}")
        elif row:
            self.stream.write(f"[{where}] {what}\n")
        self.stream.flush()


def _num(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def cells(row: dict[str, Any]) -> list[str]:
    """One table line, every column: the row's numbers formatted (its status, if not ok)."""
    head = [row["label"], row["payload"], "-" if row["system"] == "memcpy" else str(row["workers"])]
    head.append("yes" if row["touch"] else "")
    if row.get("status") != "ok":
        return [*head, row.get("status", "?"), *[""] * (len(COLUMNS) - 5)]

    def us(seconds: float | None) -> str:
        return "-" if seconds is None else _num(seconds * 1e6)

    def ratio(value: float | None, digits: int = 2) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    startup = row.get("startup_s")
    return [
        *head,
        _num(row["items_per_s"]),
        _num(row["gb_per_s"]),
        "-" if startup is None else _num(startup * 1000),
        _num(row.get("peak_rss_mb")),
        us(row.get("cpu_s_per_item")),
        us(row.get("consumer_cpu_s_per_item")),
        ratio(row.get("vs_counterpart")),
        ratio(row.get("vs_memcpy"), 3),
    ]


def _missing_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    """One line per reason a peer was not measured (three tensorpack runners missing for
    one reason are one line, however many payloads and workers)."""
    why: dict[str, list[str]] = {}
    for row in rows:
        status = row.get("status", "")
        if status.startswith("not installed"):
            labels = why.setdefault(status, [])
            if row["label"] not in labels:
                labels.append(row["label"])
    return [f"not measured: {', '.join(labels)}: {status}" for status, labels in why.items()]


def table(rows: Sequence[dict[str, Any]]) -> str:
    """The results as a plain-text table, one block per payload. A row that failed shows
    its status; peers that are not installed are one line each reason, below the table."""
    missing = _missing_lines(rows)
    shown = [r for r in rows if not r.get("status", "").startswith("not installed")]
    keep = [i for i, (name, _, _) in enumerate(COLUMNS) if name != "touch"]
    if any(r["touch"] for r in shown):
        keep = list(range(len(COLUMNS)))
    columns = [COLUMNS[i] for i in keep]
    status_at = sum(1 for i in keep if i < 4)  # where a failed row's status starts
    lines = [[cells(r)[i] for i in keep] for r in shown]
    headers = [name for name, _, _ in columns]
    ok = [line for line, r in zip(lines, shown, strict=True) if r.get("status") == "ok"]
    widths = [max(len(line[i]) for line in [*ok, headers]) for i in range(len(columns))]
    for i in range(status_at):
        widths[i] = max(len(line[i]) for line in [*lines, headers])

    def fmt(line: list[str], failed: bool = False) -> str:
        if failed:
            head = "  ".join(f"{line[i]:<{widths[i]}}" for i in range(status_at))
            return f"{head}  {line[status_at]}"
        return "  ".join(
            f"{cell:{align}{width}}"
            for cell, (_, align, _), width in zip(line, columns, widths, strict=True)
        ).rstrip()

    out = [fmt(headers), "  ".join("-" * w for w in widths)]
    previous = None
    for line, row in zip(lines, shown, strict=True):
        if previous is not None and row["payload"] != previous:
            out.append("")
        previous = row["payload"]
        out.append(fmt(line, failed=row.get("status") != "ok"))
    if missing:
        out.append("")
        out.extend(missing)
    return "\n".join(out)


def title(machine: dict[str, Any] | None) -> str:
    """What the numbers were measured on, in one line: cores, load, Python, versions."""
    if not machine:
        return "flowplug bench"
    parts = [
        f"flowplug {machine.get('flowplug')}",
        f"{machine.get('cpus')} cores",
        f"Python {machine.get('python')}",
        f"numpy {machine.get('numpy')}",
        f"pyzmq {machine.get('pyzmq')} (libzmq {machine.get('libzmq')})",
    ]
    parts += [f"{dist} {machine[dist]}" for dist in ("torch", "tensorpack") if machine.get(dist)]
    load = machine.get("load_average")
    if load:
        parts.append(f"load {load[0]:.1f}")
    return ", ".join(parts)


def _threads(row: dict[str, Any]) -> bool:
    """True for a system whose workers are threads: they hand references over, so its
    GB/s measures no copy."""
    return row["system"] == "tp-thread" or row.get("counterpart") == "tp-thread"


def plot(rows: Sequence[dict[str, Any]], path: str, machine: dict[str, Any] | None = None) -> None:
    """Bar charts of items/s and GB/s per payload, one bar per system, one pair of charts
    per (workers, touch) group; log scales (the payloads span six orders of magnitude);
    the machine and versions in the title. Saved to ``path``.

    :raises ImportError: matplotlib is not installed (``pip install 'flowplug[plot]'``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("status") == "ok"]
    groups = sorted({(r["workers"], r["touch"]) for r in ok if r["system"] != "memcpy"})
    groups = groups or [(1, False)]
    payloads = list(dict.fromkeys(r["payload"] for r in ok))
    labels = list(dict.fromkeys(r["label"] for r in ok))
    fig, axes = plt.subplots(len(groups), 2, figsize=(16, 4.2 * len(groups) + 0.8), squeeze=False)
    width = 0.8 / max(len(labels), 1)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for (ax_items, ax_gb), (workers, touch) in zip(axes, groups, strict=True):
        for j, label in enumerate(labels):
            items, gbs = [], []
            for payload in payloads:
                match = [
                    r
                    for r in ok
                    if r["label"] == label
                    and r["payload"] == payload
                    and (r["system"] == "memcpy" or (r["workers"], r["touch"]) == (workers, touch))
                ]
                items.append(match[0]["items_per_s"] if match else 0.0)
                copies = match and not _threads(match[0])
                gbs.append(match[0]["gb_per_s"] if copies else 0.0)
            xs = [i + (j - len(labels) / 2 + 0.5) * width for i in range(len(payloads))]
            color = colors[j % len(colors)]
            ax_items.bar(xs, items, width, label=label, color=color)
            ax_gb.bar(xs, gbs, width, label=label, color=color)
        what = f"{workers} worker{'s' if workers > 1 else ''}"
        what += ", consumer reads every byte" if touch else ""
        for ax, unit, note in (
            (ax_items, "items/s", ""),
            (ax_gb, "GB/s", " (thread workers copy nothing: no bar)"),
        ):
            ax.set_xticks(range(len(payloads)), payloads)
            ax.set_yscale("log")
            ax.set_ylabel(f"{unit} (log scale)")
            ax.set_title(f"{unit} per payload, {what}{note}", fontsize="medium")
            ax.grid(axis="y", which="major", alpha=0.3)
    handles, names = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=min(len(names), 5), fontsize="small")
    fig.suptitle(title(machine), fontsize="medium")
    rows_of_legend = (len(names) + 4) // 5
    fig.tight_layout(rect=(0, 0.035 * rows_of_legend / len(groups) * 2, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)
