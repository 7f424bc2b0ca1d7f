"""flowplug: move datapoints from parallel producers to one consumer via pluggable transports."""

from ._workers import ProcessWorkers
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
from .plugins import available_transports, get_transport, reload_plugins
from .runner import Runner
from .transport import EMPTY, Death, Endpoint, Option, Sender, Transport, WorkerGroup
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
    "Death",
    "Endpoint",
    "FlowplugError",
    "Option",
    "PluginError",
    "ProcessWorkers",
    "Runner",
    "RunnerTimeout",
    "Sender",
    "StateError",
    "Transport",
    "TransportClosed",
    "TransportNotFound",
    "UnknownLength",
    "WorkerDied",
    "WorkerError",
    "WorkerGroup",
    "WorkerInfo",
    "available_transports",
    "get_transport",
    "hookimpl",
    "parse_size",
    "reload_plugins",
    "worker_info",
]
