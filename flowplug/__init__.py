"""flowplug: move datapoints from parallel producers to one consumer via pluggable transports."""

from .config import parse_size
from .dataflow import DataFlow, DataFlowLike, DataFromGenerator, DataFromList
from .errors import (
    ConfigError,
    DataTooLarge,
    FlowplugError,
    PluginError,
    RunnerTimeout,
    StateError,
    TransportClosed,
    TransportNotFound,
    UnknownLength,
    WorkerDied,
    WorkerError,
)
from .hookspecs import hookimpl
from .parallel import ParallelMap
from .plugins import available_transports, get_transport, reload_plugins
from .runner import Runner
from .transport import EMPTY, Endpoint, Option, Sender, TaskEndpoint, TaskReceiver, Transport
from .worker import WorkerInfo, worker_info

__version__ = "0.1.0"

__all__ = [
    "EMPTY",
    "ConfigError",
    "DataFlow",
    "DataFlowLike",
    "DataFromGenerator",
    "DataFromList",
    "DataTooLarge",
    "Endpoint",
    "FlowplugError",
    "Option",
    "ParallelMap",
    "PluginError",
    "Runner",
    "RunnerTimeout",
    "Sender",
    "StateError",
    "TaskEndpoint",
    "TaskReceiver",
    "Transport",
    "TransportClosed",
    "TransportNotFound",
    "UnknownLength",
    "WorkerDied",
    "WorkerError",
    "WorkerInfo",
    "available_transports",
    "get_transport",
    "hookimpl",
    "parse_size",
    "reload_plugins",
    "worker_info",
]
