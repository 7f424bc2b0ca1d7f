"""The ``flowplug`` command.

Exit codes: 0 ok, 1 failure, 2 usage error. Errors are one line; ``--debug`` shows the
traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

from . import plugins
from .errors import ConfigError, FlowplugError


def _cmd_transports(args: argparse.Namespace) -> int:
    registry = plugins.get_registry()
    rows = []
    for name, cls in sorted(registry.transports.items()):
        origin = registry.origin[name]
        rows.append(
            {
                "name": name,
                "distribution": origin.distribution,
                "version": origin.version,
                "crosses_processes": cls.crosses_processes,
                "zero_copy": cls.zero_copy,
                "options": [
                    {"name": o.name, "type": o.type.__name__, "default": o.default, "help": o.help}
                    for o in cls.options
                ],
            }
        )
    broken = [b.describe() for b in registry.broken.values()]
    if args.json:
        print(json.dumps({"transports": rows, "broken": broken}, indent=2, default=str))
        return 0
    for row in rows:
        kind = "processes" if row["crosses_processes"] else "threads"
        zc = ", zero-copy" if row["zero_copy"] else ""
        print(f"{row['name']:<10} {row['distribution']} {row['version']}  ({kind}{zc})")
        for opt in row["options"]:
            print(f"    {opt['name']}: {opt['type']} = {opt['default']!r}  {opt['help']}")
    for line in broken:
        print(f"BROKEN  {line}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    import numpy as np

    from .dataflow import DataFromGenerator
    from .runner import Runner

    names = args.transport or sorted(plugins.available_transports())
    shape = (args.mb * 1024 * 1024,)
    items = [np.full(shape, i, dtype=np.uint8) for i in range(8)]
    print(
        f"pushing {args.mb} MB uint8 arrays through each transport, "
        f"{args.workers} worker(s), {args.seconds:g} s each"
    )
    source = DataFromGenerator(lambda: items)
    for name in names:
        with Runner(source, transport=name, num_workers=args.workers) as runner:
            it = iter(runner)
            next(it)  # startup is not throughput
            count, start = 0, time.perf_counter()
            while time.perf_counter() - start < args.seconds:
                dp = next(it)
                assert dp[0] == dp[-1]
                count += 1
            elapsed = time.perf_counter() - start
            it.close()
        rate = count / elapsed
        gib = rate * args.mb / 1024
        print(f"{name:<10} {rate:10.1f} items/s  {gib:6.2f} GiB/s")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    # Imported here: the harness (and numpy) is not needed by the other commands.
    from . import bench
    from .bench.harness import PEER_KEYS
    from .config import resolve_settings

    if args.all:
        args.transport = args.transport or ["all"]
        args.peers = args.peers or "all"
        args.workers = args.workers or [1, 2]
        args.touch = args.touch or "both"
    transports = args.transport or [resolve_settings().transport]
    if "all" in transports:
        transports = sorted(plugins.available_transports())
    for name in transports:
        plugins.get_transport(name)  # an unknown name fails here, with "did you mean"
    peers = _choose(args.peers or "all", PEER_KEYS, "peer")
    payloads = args.payload or (["small", "medium"] if args.quick else list(bench.PAYLOADS))
    _choose(",".join(payloads), tuple(bench.PAYLOADS), "payload")
    quick = args.quick
    config = bench.BenchConfig(
        transports=transports,
        peers=peers,
        payloads=payloads,
        workers=args.workers or [1],
        touch={"off": [False], "on": [True], "both": [False, True]}[args.touch or "off"],
        warmup=args.warmup if args.warmup is not None else (0.05 if quick else 0.5),
        seconds=args.seconds if args.seconds is not None else (0.1 if quick else 1.0),
        repeats=args.repeats if args.repeats is not None else (1 if quick else 3),
    )
    result = bench.run(config, progress=None if args.json == "-" else bench.Progress())
    if args.json == "-":
        print(json.dumps(result, indent=1))
    else:
        print(bench.table(result["rows"]))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
            print(f"wrote {args.json}")
    if args.plot:
        try:
            bench.plot(result["rows"], args.plot)
        except ImportError:
            print(
                "flowplug: --plot needs matplotlib: pip install 'flowplug[plot]'", file=sys.stderr
            )
            return 1
        print(f"wrote {args.plot}", file=sys.stderr if args.json == "-" else sys.stdout)
    return 0


def _choose(value: str, choices: Sequence[str], what: str) -> list[str]:
    """Parse a comma-separated list of ``choices``, ``all`` or ``none``."""
    if value == "all":
        return list(choices)
    if value == "none":
        return []
    names = [v.strip() for v in value.split(",") if v.strip()]
    for name in names:
        if name not in choices:
            raise ConfigError(f"unknown {what} {name!r}; choose from {', '.join(choices)}")
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flowplug", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("transports", help="list installed transports and their options")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_transports)

    p = sub.add_parser("demo", help="push arrays through every transport and print items/s")
    p.add_argument("-t", "--transport", action="append", help="only this transport (repeatable)")
    p.add_argument("-w", "--workers", type=int, default=1)
    p.add_argument("--mb", type=int, default=1, help="array size in MiB")
    p.add_argument("--seconds", type=float, default=2.0)
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser(
        "bench",
        help="measure transports side by side with tensorpack, torch, pyzmq and memcpy",
        description="Each row runs in a fresh process: startup, warm-up, then the median of "
        "--repeats timed runs. Peers that are not installed are reported, never faked.",
    )
    p.add_argument(
        "-t",
        "--transport",
        action="append",
        help="flowplug transport to measure (repeatable; 'all'); default: the default transport",
    )
    p.add_argument(
        "--peers",
        help="comma-separated peers: tp-queue, tp-zmq, tp-thread, torch, pyzmq; "
        "'all' (default) or 'none'",
    )
    p.add_argument(
        "-p",
        "--payload",
        action="append",
        help="small, medium, large, xl, dict (repeatable); default: all",
    )
    p.add_argument("-w", "--workers", action="append", type=int, help="(repeatable) default: 1")
    p.add_argument(
        "--touch",
        choices=("off", "on", "both"),
        help="the consumer reads every byte of each item (default: off)",
    )
    p.add_argument("--seconds", type=float, help="seconds per repeat (default 1)")
    p.add_argument("--warmup", type=float, help="seconds of warm-up per row (default 0.5)")
    p.add_argument("--repeats", type=int, help="timed repeats per row; median (default 3)")
    p.add_argument("--quick", action="store_true", help="small payloads, short runs, 1 repeat")
    p.add_argument(
        "--all",
        action="store_true",
        help="every transport and peer, 1 and 2 workers, touch off and on (the full table)",
    )
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON ('-': stdout)")
    p.add_argument("--plot", metavar="PNG", help="bar chart of GB/s (needs matplotlib)")
    p.set_defaults(func=_cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result: Any = args.func(args)
    except FlowplugError as exc:
        if args.debug:
            raise
        print(f"flowplug: error: {exc}", file=sys.stderr)
        return 1
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
