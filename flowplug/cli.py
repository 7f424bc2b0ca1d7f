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
from .errors import FlowplugError


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
                "carries_tasks": cls.carries_tasks,
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
        zc += ", carries tasks" if row["carries_tasks"] else ""
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
