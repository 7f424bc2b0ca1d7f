"""flowplug: move datapoints from parallel producers to one consumer via pluggable transports."""

from types import ModuleType as _ModuleType
from typing import TYPE_CHECKING

from .batching import BatchingSender
from .config import Settings, parse_size
from .dataflow import Batch, DataFlow, DataFlowLike, DataFromGenerator, DataFromList
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
from .worker_groups import ControlSink, Death, OwnWorkersTransport, ProcessWorkers, WorkerGroup
from .worker_loop import WorkerInfo, worker_info

__version__ = "0.1.0"

if TYPE_CHECKING:
    from . import shm


def __getattr__(name: str) -> _ModuleType:
    # flowplug.shm needs numpy; load it on first use so that `import flowplug` stays light.
    if name == "shm":
        import importlib

        return importlib.import_module(".shm", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
