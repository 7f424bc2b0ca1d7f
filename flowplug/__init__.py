"""flowplug: move datapoints from parallel producers to one consumer via pluggable transports."""

from .config import Settings, load_config, parse_size
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
from .transport import EMPTY, BatchingSender, Endpoint, Option, Sender, Transport
from .worker import WorkerInfo, worker_info

__version__ = "0.1.0"

__all__ = [
    "BatchingSender",
    "ConfigError",
    "DataFlow",
    "DataFlowLike",
    "DataFromGenerator",
    "DataFromList",
    "DataTooLarge",
    "EMPTY",
    "Endpoint",
    "FlowplugError",
    "Option",
    "PluginError",
    "Runner",
    "RunnerTimeout",
    "Sender",
    "Settings",
    "StateError",
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
    "load_config",
    "parse_size",
    "reload_plugins",
    "worker_info",
]
