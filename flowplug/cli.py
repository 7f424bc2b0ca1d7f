"""The ``flowplug`` command: list transports, show the config, check the platform.

Exit codes: 0 ok, 1 failure, 2 usage error (a bad command line: an unknown option, a value
out of range, an unknown transport, payload or peer). Each error is one line on stderr,
printed before any other output of the command; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import shutil
import sys
import time
from collections.abc import Sequence
from importlib import metadata
from typing import Any

from . import __version__, _sweep, config, plugins
from .errors import ConfigError, FlowplugError, TransportNotFound
from .ipc import bind_ipc

#: what ``flowplug --help`` says first (plain text: argparse prints it as is).
DESCRIPTION = (
    "List the installed flowplug transports, show the effective configuration, check the "
    "platform, and measure the transports on this machine."
)
EPILOG = "Exit codes: 0 ok, 1 failure, 2 usage error. Docs: docs/cli.md in the repository."


class UsageError(Exception):
    """A bad command line found after parsing: exit 2 with the subcommand's usage."""


def _check_transports(names: Sequence[str]) -> None:
    """Raise :class:`UsageError` for a name no installed transport has (a broken plugin
    is a runtime failure: its own error, exit 1, when it is used)."""
    for name in names:
        try:
            plugins.get_transport(name)
        except TransportNotFound as exc:
            raise UsageError(str(exc)) from None


def _option_default(opt: Any) -> str:
    """An option's default as a user writes it: sizes in units (``1 GiB``), others repr'd."""
    if opt.size and isinstance(opt.default, int):
        return config.format_size(opt.default)
    return repr(opt.default)


def _show(value: Any, opt: Any = None) -> str:
    """A setting's value for ``flowplug config``: sizes in units, the rest repr'd."""
    if opt is not None and opt.size and isinstance(value, int) and not isinstance(value, bool):
        return config.format_size(value)
    return repr(value)


def _registry() -> plugins.TransportRegistry:
    """The registry, plus the plugins a valid config file names (autoload off)."""
    registry = plugins.get_registry()
    try:
        settings = config.read_settings()
    except ConfigError:
        return registry  # `flowplug config` and `flowplug doctor` report a bad config
    if settings.plugins:
        registry.ensure(settings.plugins, settings.source("plugins"))
    return registry


def _cmd_transports(args: argparse.Namespace) -> int:
    registry = _registry()
    rows: list[dict[str, Any]] = []
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
                    {
                        "name": o.name,
                        "type": "size" if o.size else o.type.__name__,
                        "default": o.default,
                        "shown": _option_default(o),
                        "help": o.help,
                    }
                    for o in cls.options
                ],
            }
        )
    broken = [b.describe() for b in registry.broken.values()]
    conflicts = [str(err) for err in registry.conflicts.values()]
    if args.json:
        for row in rows:
            for opt in row["options"]:
                del opt["shown"]
        print(
            json.dumps(
                {"transports": rows, "broken": broken, "conflicts": conflicts},
                indent=2,
                default=str,
            )
        )
        return 0
    for row in rows:
        kind = "processes" if row["crosses_processes"] else "threads"
        zc = ", zero-copy" if row["zero_copy"] else ""
        zc += ", carries tasks" if row["carries_tasks"] else ""
        print(f"{row['name']:<10} {row['distribution']} {row['version']}  ({kind}{zc})")
        for opt in row["options"]:
            print(f"    {opt['name']}: {opt['type']} = {opt['shown']}  {opt['help']}")
    for line in broken:
        print(f"BROKEN  {line}")
    for line in conflicts:
        print(f"CONFLICT  {line}")
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    settings = plugins.load_config(args.file)
    registry = plugins.get_registry()
    values = {key: getattr(settings, key) for key in config.SETTINGS}
    values["plugins"] = list(values["plugins"])
    shown = {key: {"value": value, "source": settings.source(key)} for key, value in values.items()}
    # The selected transport's every option (declared defaults included), then any other
    # table the files set.
    tables: dict[str, dict[str, Any]] = {}
    selected = registry.transports.get(settings.transport)
    if selected is not None:
        tables[settings.transport] = {
            k: {"value": v, "source": settings.source(f"transports.{settings.transport}.{k}")}
            for k, v in settings.options_for(selected).items()
        }
    for name, options in settings.transports.items():
        if name not in tables:
            tables[name] = {
                k: {"value": v, "source": settings.source(f"transports.{name}.{k}")}
                for k, v in options.items()
            }
    if args.json:
        print(
            json.dumps(
                {"files": list(settings.files), "settings": shown, "transports": tables},
                indent=2,
                default=str,
            )
        )
        return 0
    files = ", ".join(settings.files) or "none (no flowplug.toml, no [tool.flowplug])"
    print(f"config files: {files}")
    for key, item in shown.items():
        print(f"{key:<14} = {item['value']!r:<20} ({item['source']})")
    for name, options in tables.items():
        cls = registry.transports.get(name)
        declared = {o.name: o for o in cls.options} if cls is not None else {}
        print(f"[transports.{name}]")
        for key, item in options.items():
            value = _show(item["value"], declared.get(key))
            print(f"{key:<14} = {value:<20} ({item['source']})")
    return 0


def _cmd_doctor(args: argparse.Namespace) -> int:
    checks: list[tuple[str, str]] = []  # (status, message); status is ok, warn or FAIL

    def check(status: str, message: str) -> None:
        checks.append((status, message))
        print(f"{status:<4}  {message}")

    version = metadata.version("flowplug")
    check("ok", f"flowplug {version}, Python {platform.python_version()} on {sys.platform}")
    methods = mp.get_all_start_methods()
    if "fork" in methods:
        check("ok", f"start methods: {', '.join(methods)}")
    else:
        check(
            "warn",
            f"start methods: {', '.join(methods)}; no fork, so workers start with spawn and "
            "every dataflow must be picklable (or be passed as a factory)",
        )
    _check_ipc(check)
    _check_send_buffer(check)
    _check_shm(check, args.clean)
    for dist, purpose in (("pyzmq", "the zmq transport"), ("pyarrow", "Arrow datapoints")):
        try:
            check("ok", f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            check("FAIL", f"{dist} is not installed ({purpose} needs it): pip install {dist}")
    # The config first: its plugins = [...] load before the transports are listed.
    try:
        settings = plugins.load_config()
    except FlowplugError as exc:
        check("FAIL", f"config: {exc}")
    else:
        files = ", ".join(settings.files) or "defaults only"
        check("ok", f"config: transport {settings.transport!r} from {files}")
    registry = plugins.get_registry()
    names = ", ".join(sorted(registry.transports)) or "none"
    autoload = "on" if registry.autoload else "off (FLOWPLUG_DISABLE_PLUGIN_AUTOLOAD)"
    check("ok", f"transports: {names}; plugin autoload {autoload}")
    for broken in registry.broken.values():
        check("FAIL", broken.describe())
    for err in registry.conflicts.values():
        check("FAIL", str(err))
    failed = sum(status == "FAIL" for status, _ in checks)
    print(f"{failed} problem(s) to fix" if failed else "no problems found")
    return 1 if failed else 0


def _check_ipc(check: Any) -> None:
    """Bind a real zmq ipc:// socket, as the zmq and shm transports do."""
    try:
        import zmq
    except ImportError:
        return  # reported with the versions
    if not zmq.has("ipc"):
        check("FAIL", "pyzmq was built without ipc:// support; reinstall it from PyPI wheels")
        return
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    try:
        sock.unbind(bind_ipc(sock, f"doctor-{os.getpid()}"))
    except ConfigError as exc:
        check("FAIL", str(exc))
    else:
        check("ok", f"ipc:// sockets work (zmq {zmq.zmq_version()})")
    finally:
        sock.close(linger=0)
        ctx.term()


#: Linux's limit on a socket's send buffer (a process gets at most twice this).
_WMEM_MAX = "/proc/sys/net/core/wmem_max"
#: what the zmq transport's direct connections ask for (flowplug_zmq's _DIRECT_SNDBUF).
_WMEM_WANTED = 4 << 20


def _check_send_buffer(check: Any) -> None:
    """The kernel's room for a socket's unsent bytes: zmq's datapoints of 1 MiB or more
    go fast only when a whole one fits (docs/performance.md)."""
    try:
        with open(_WMEM_MAX) as f:
            wmem_max = int(f.read())
    except (OSError, ValueError):
        return  # not Linux, or not readable here: nothing to say
    if wmem_max >= _WMEM_WANTED:
        check("ok", f"net.core.wmem_max: {_mib(wmem_max)}")
        return
    check(
        "ok",
        f"net.core.wmem_max: {_mib(wmem_max)}; transport 'zmq' sends datapoints of 1 MiB "
        f"and more faster with {_mib(_WMEM_WANTED)} "
        f"(sudo sysctl -w net.core.wmem_max={_WMEM_WANTED})",
    )


def _check_shm(check: Any, clean: bool) -> None:
    shm_dir = _sweep.default_dir()
    try:
        usage = shutil.disk_usage(shm_dir)
    except FileNotFoundError:
        check("warn", f"no {shm_dir}: shared-memory transports cannot run; use zmq or queue")
        return
    size = f"{shm_dir}: {_mib(usage.total)} total, {_mib(usage.free)} free"
    if usage.total < 1024**3:
        check(
            "warn",
            f"{size}; under 1 GiB (Docker's default is 64 MiB): start the container with "
            "--shm-size=8g, use transport 'shm' with option dir= on a disk, or use 'zmq'",
        )
    else:
        check("ok", size)
    stale = _sweep.stale_entries(shm_dir)
    if clean:
        removed = set(_sweep.sweep_stale(shm_dir))
        gone = [s for s in stale if s.path in removed]
        total = _mib(sum(s.size for s in gone))
        check("ok", f"removed {len(removed)} stale flowplug segment(s), {total}")
        for path in sorted(removed):
            pid = next((s.pid for s in gone if s.path == path), "?")
            print(f"      removed {path} (pid {pid} is gone)")
        return
    if not stale:
        check("ok", "no stale flowplug segments")
        return
    total = _mib(sum(s.size for s in stale))
    check(
        "FAIL",
        f"{len(stale)} stale flowplug segment(s) hold {total} of {shm_dir}: their owner "
        "processes are gone; run `flowplug doctor --clean` to remove them",
    )
    for s in stale:
        print(f"      {s.path} (pid {s.pid} is gone)")


def _mib(n: int) -> str:
    return f"{n / 1024**2:.1f} MiB"


def _cmd_demo(args: argparse.Namespace) -> int:
    names = args.transport or sorted(plugins.available_transports())
    _check_transports(names)  # before the header: a usage error prints nothing else

    import numpy as np

    from .dataflow import DataFromGenerator
    from .runner import Runner

    shape = (args.mb * 1024 * 1024,)
    items = [np.full(shape, i, dtype=np.uint8) for i in range(8)]
    print(
        f"pushing {args.mb} MiB uint8 arrays through each transport, "
        f"{args.workers} worker(s), {args.seconds:g} s each"
    )
    source = DataFromGenerator(lambda: items)
    for name in names:
        with Runner(source, transport=name, num_workers=args.workers) as runner:
            it = runner.__iter__()
            next(it)  # startup is not throughput
            count, start = 0, time.perf_counter()
            while time.perf_counter() - start < args.seconds:
                dp = next(it)
                assert dp[0] == dp[-1]
                count += 1
            elapsed = time.perf_counter() - start
            it.close()
            verdict = runner.stats().verdict
        rate = count / elapsed
        if plugins.get_transport(name).crosses_processes:
            moved = f"{rate * args.mb / 1024:6.2f} GiB/s"
        else:  # threads hand the same array over: nothing moves, a GiB/s would be fiction
            moved = "no copy (reference handed over)"
        print(f"{name:<10} {rate:10.1f} items/s  {moved}  {verdict}", flush=True)
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    # Imported here: the harness (and numpy) is not needed by the other commands.
    from . import bench
    from .bench.harness import PEER_KEYS

    if args.all:
        args.transport = args.transport or ["all"]
        args.peers = args.peers or "all"
        args.workers = args.workers or [1, 2]
        args.touch = args.touch or "both"
    transports = args.transport or ["all"]
    if "all" in transports:
        transports = sorted(plugins.available_transports())
    _check_transports(transports)  # an unknown name: exit 2, with "did you mean"
    peers = _choose(args.peers or "all", PEER_KEYS, "peer")
    payloads = args.payload or (["small", "medium"] if args.quick else list(bench.PAYLOADS))
    _choose(",".join(payloads), tuple(bench.PAYLOADS), "payload")
    if args.plot:
        try:
            import matplotlib  # noqa: F401  (checked before minutes of measuring, not after)
        except ImportError:
            raise FlowplugError("--plot needs matplotlib: pip install 'flowplug[plot]'") from None
    quick = args.quick
    # --all: 3 interleaved rounds (a ratio of rows measured seconds apart, three times);
    # the rounds replace the repeats: the full table takes ~13 min, not ~23.
    rounds = args.rounds or (3 if args.all and not quick else 1)
    bench_config = bench.BenchConfig(
        transports=transports,
        peers=peers,
        payloads=payloads,
        workers=args.workers or [1],
        touch={"off": [False], "on": [True], "both": [False, True]}[args.touch or "off"],
        warmup=args.warmup if args.warmup is not None else (0.05 if quick else 0.3),
        seconds=args.seconds if args.seconds is not None else (0.1 if quick else 0.5),
        repeats=args.repeats if args.repeats is not None else (1 if quick or rounds > 1 else 3),
        rounds=rounds,
    )
    result = bench.run(bench_config, progress=None if args.json == "-" else bench.Progress())
    if args.json == "-":
        print(json.dumps(result, indent=1))
    else:
        print(bench.table(result["rows"]))
        for row in result["rows"]:
            if row.get("verdict"):  # the runner's own view (docs/bottleneck.md)
                print(f"verdict of {row['label']}, {row['payload']}: {row['verdict']}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
            print(f"wrote {args.json}")
    if args.plot:
        bench.plot(result["rows"], args.plot, result["machine"])
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
            raise UsageError(f"unknown {what} {name!r}; choose from {', '.join(choices)}")
    return names


def _int_at_least(low: int) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    parse.__name__ = "integer"
    return parse


def _seconds(positive: bool) -> Any:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
        if not (value > 0 if positive else value >= 0) or value != value or value == float("inf"):
            need = "more than 0" if positive else "0 or more"
            raise argparse.ArgumentTypeError(f"must be {need} seconds, got {text}")
        return value

    parse.__name__ = "seconds"
    return parse


class _Formatter(argparse.HelpFormatter):
    """argparse's, with room for the subcommand names beside their help."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=28)

    def add_argument(self, action: argparse.Action) -> None:
        super().add_argument(action)
        if isinstance(action, argparse._SubParsersAction):  # argparse forgets their indent
            names = [len(a.dest) for a in action._get_subactions()]
            longest = max(names, default=0) + self._current_indent + 4
            self._action_max_length = max(self._action_max_length, longest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flowplug", description=DESCRIPTION, epilog=EPILOG, formatter_class=_Formatter
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"flowplug {__version__} (Python {platform.python_version()})",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands")

    def add(name: str, help: str, **kwargs: Any) -> argparse.ArgumentParser:
        description = kwargs.pop("description", help[0].upper() + help[1:] + ".")
        p = sub.add_parser(
            name, help=help, description=description, formatter_class=_Formatter, **kwargs
        )
        p.set_defaults(parser=p)
        return p

    p = add("transports", "list installed transports and their options")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_cmd_transports)

    p = add("config", "show the effective config and where each value came from")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument(
        "-f", "--file", help="read this file instead of ./flowplug.toml, ./pyproject.toml"
    )
    p.set_defaults(func=_cmd_config)

    p = add("doctor", "check the platform and the installed plugins")
    p.add_argument("--clean", action="store_true", help="remove stale flowplug /dev/shm segments")
    p.set_defaults(func=_cmd_doctor)

    p = add(
        "demo",
        "push arrays through every transport and print items/s",
        description="Push arrays through every installed transport (or those given with -t) "
        "and print items/s and GiB/s: a quick look, not a benchmark (see flowplug bench).",
    )
    p.add_argument("-t", "--transport", action="append", help="only this transport (repeatable)")
    p.add_argument("-w", "--workers", type=_int_at_least(1), default=1, help="default: 1")
    p.add_argument("--mb", type=_int_at_least(1), default=1, help="array size in MiB (default 1)")
    p.add_argument("--seconds", type=_seconds(True), default=2.0, help="per transport (default 2)")
    p.set_defaults(func=_cmd_demo)

    p = add(
        "bench",
        "measure transports side by side with tensorpack, torch, pyzmq and memcpy",
        description="Each row runs in a fresh process: startup, warm-up, then the median of "
        "--repeats timed runs. With --rounds N the whole table is measured N times over and "
        "each row's items/s is the median of its rounds'. Peers that are not installed are "
        "reported, never faked.",
    )
    p.add_argument(
        "-t",
        "--transport",
        action="append",
        help="flowplug transport to measure (repeatable); default: every installed one ('all')",
    )
    p.add_argument(
        "--peers",
        help="comma-separated peers: tp-queue, tp-zmq, tp-thread, torch, pyzmq, shm-ring "
        "(the raw shared-memory baseline); 'all' (default) or 'none'",
    )
    p.add_argument(
        "-p",
        "--payload",
        action="append",
        help="small, medium, large, xl, dict (repeatable); default: all",
    )
    p.add_argument(
        "-w", "--workers", action="append", type=_int_at_least(1), help="(repeatable) default: 1"
    )
    p.add_argument(
        "--touch",
        choices=("off", "on", "both"),
        help="the consumer reads every byte of each item (default: off)",
    )
    p.add_argument("--seconds", type=_seconds(True), help="seconds per repeat (default 0.5)")
    p.add_argument(
        "--warmup", type=_seconds(False), help="seconds of warm-up per row and round (default 0.3)"
    )
    p.add_argument(
        "--repeats",
        type=_int_at_least(1),
        help="timed repeats per row and round; median (default 3; 1 with --rounds > 1)",
    )
    p.add_argument(
        "--rounds",
        type=_int_at_least(1),
        help="measure every row N times over, one round after the other; median of the "
        "rounds (default 1; 3 with --all)",
    )
    p.add_argument("--quick", action="store_true", help="small payloads, short runs, 1 repeat")
    p.add_argument(
        "--all",
        action="store_true",
        help="every transport and peer, 1 and 2 workers, touch off and on (the full table)",
    )
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON ('-': stdout)")
    p.add_argument(
        "--plot", metavar="PNG", help="charts of items/s and GB/s per payload (needs matplotlib)"
    )
    p.set_defaults(func=_cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; return its exit code (0 ok, 1 failure, 2 usage error)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: 2 for a usage error, 0 for --help and --version
        return exc.code if isinstance(exc.code, int) else 2
    try:
        result: Any = args.func(args)
    except UsageError as exc:
        try:
            args.parser.error(str(exc))  # the subcommand's usage line, then the message
        except SystemExit:
            return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `flowplug transports | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as exc:
        if args.debug:
            raise
        what = "" if isinstance(exc, FlowplugError) else f"{type(exc).__name__}: "
        problems = exc.problems if isinstance(exc, ConfigError) else [str(exc)]
        lines = [" ".join(p.split()) for p in problems]  # one line each, whatever they hold
        lines[-1] += " (--debug shows the traceback)"
        for line in lines:
            print(f"flowplug: error: {what}{line}", file=sys.stderr)
        return 1
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
