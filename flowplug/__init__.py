"""flowplug: move datapoints from parallel producers to one consumer via pluggable transports.

Every public name is imported on first use (PEP 562 ``__getattr__``), from the module that
defines it: ``import flowplug`` loads only the errors, and a process that needs one part of
flowplug loads that part. A Ray actor hosting one worker, for example, needs the worker
group and the send loop, not the Runner, the configuration files or the plugin registry.
"""

from typing import TYPE_CHECKING

# The errors come at once: they are small, and _exc teaches WorkerError to pickle with its
# original exception (WorkerError._reduce), wherever a WorkerError may be pickled.
from . import _exc  # noqa: F401
from .errors import (
    ConfigError,
    DataTooLarge,
    FlowplugError,
    ObjectNotFound,
    PluginError,
    ReplicateWarning,
    RunnerTimeout,
    ShardMismatch,
    StateError,
    StoreFull,
    TransportClosed,
    TransportNotFound,
    UnknownLength,
    WorkerDied,
    WorkerError,
)

__version__ = "0.1.0"

#: the other public names, by the module (flowplug.<module>) that defines them.
_LAZY = {
    "BatchingSender": "batching",
    "Settings": "config",
    "parse_size": "config",
    "Batch": "dataflow",
    "DataFlow": "dataflow",
    "DataFlowLike": "dataflow",
    "DataFromGenerator": "dataflow",
    "DataFromList": "dataflow",
    "hookimpl": "hookspecs",
    "ZmqSockets": "ipc",
    "bind_ipc": "ipc",
    "ParallelMap": "parallel",
    "available_transports": "plugins",
    "get_transport": "plugins",
    "load_config": "plugins",
    "reload_plugins": "plugins",
    "Runner": "runner",
    "RunnerStats": "stats",
    "WorkerStats": "stats",
    "EMPTY": "transport",
    "Endpoint": "transport",
    "OpenFiles": "transport",
    "Option": "transport",
    "Sender": "transport",
    "TaskEndpoint": "transport",
    "TaskReceiver": "transport",
    "TaskTransport": "transport",
    "Transport": "transport",
    "ControlSink": "worker_groups",
    "Death": "worker_groups",
    "OwnWorkersTransport": "worker_groups",
    "ProcessWorkers": "worker_groups",
    "WorkerGroup": "worker_groups",
    "WorkerInfo": "worker_loop",
    "worker_info": "worker_loop",
}

#: submodules reachable as attributes after ``import flowplug`` (as when it imported them
#: all at once), imported on first use; ``shm`` needs numpy. Not the integrations
#: (flowplug.torch, flowplug.jax, flowplug.compat): those import their framework.
_SUBMODULES = frozenset(
    {
        "_fds",
        "_gates",
        "_passcheck",
        "_resume",
        "_sweep",
        "batching",
        "config",
        "dataflow",
        "hookspecs",
        "ipc",
        "modes",
        "parallel",
        "plugins",
        "runner",
        "serialize",
        "shm",
        "stats",
        "transport",
        "worker_groups",
        "worker_loop",
    }
)

if TYPE_CHECKING:
    from . import shm
    from .batching import BatchingSender
    from .config import Settings, parse_size
    from .dataflow import Batch, DataFlow, DataFlowLike, DataFromGenerator, DataFromList
    from .hookspecs import hookimpl
    from .ipc import ZmqSockets, bind_ipc
    from .parallel import ParallelMap
    from .plugins import available_transports, get_transport, load_config, reload_plugins
    from .runner import Runner
    from .stats import RunnerStats, WorkerStats
    from .transport import (
        EMPTY,
        Endpoint,
        OpenFiles,
        Option,
        Sender,
        TaskEndpoint,
        TaskReceiver,
        TaskTransport,
        Transport,
    )
    from .worker_groups import (
        ControlSink,
        Death,
        OwnWorkersTransport,
        ProcessWorkers,
        WorkerGroup,
    )
    from .worker_loop import WorkerInfo, worker_info
else:

    def __getattr__(name: str):
        import importlib

        module = _LAZY.get(name)
        if module is not None:
            value = getattr(importlib.import_module(f".{module}", __name__), name)
            globals()[name] = value  # found as a plain attribute from now on
            return value
        if name in _SUBMODULES:
            return importlib.import_module(f".{name}", __name__)
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

    def __dir__():
        return sorted({*globals(), *__all__})


__all__ = [
    "Batch",
    "BatchingSender",
    "ConfigError",
    "ControlSink",
    "DataFlow",
    "DataFlowLike",
    "DataFromGenerator",
    "DataFromList",
    "DataTooLarge",
    "Death",
    "EMPTY",
    "Endpoint",
    "FlowplugError",
    "ObjectNotFound",
    "OpenFiles",
    "Option",
    "OwnWorkersTransport",
    "ParallelMap",
    "PluginError",
    "ProcessWorkers",
    "ReplicateWarning",
    "Runner",
    "RunnerStats",
    "RunnerTimeout",
    "Sender",
    "Settings",
    "ShardMismatch",
    "StateError",
    "StoreFull",
    "TaskEndpoint",
    "TaskReceiver",
    "TaskTransport",
    "Transport",
    "TransportClosed",
    "TransportNotFound",
    "UnknownLength",
    "WorkerDied",
    "WorkerError",
    "WorkerGroup",
    "WorkerInfo",
    "WorkerStats",
    "ZmqSockets",
    "available_transports",
    "bind_ipc",
    "get_transport",
    "hookimpl",
    "load_config",
    "parse_size",
    "reload_plugins",
    "shm",
    "worker_info",
]
