"""The hooks a flowplug plugin can implement.

A plugin is a module named by an entry point in the group ``flowplug``::

    [project.entry-points.flowplug]
    mytransport = "my_package.plugin"

and implements hooks with :data:`flowplug.hookimpl`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from collections.abc import Callable

    from .stats import RunnerStats

hookspec = pluggy.HookspecMarker("flowplug")
hookimpl = pluggy.HookimplMarker("flowplug")


# -------------------------------------------------------------------------
# Registration hooks
# -------------------------------------------------------------------------


@hookspec
def flowplug_register_transports(register: Callable[..., None]) -> None:
    """Register the transports this plugin provides.

    Called once per process, the first time flowplug needs the list of transports
    (``fp.available_transports()``, ``fp.get_transport()``, or a ``Runner`` start).
    Never called on the per-datapoint path.

    :param register: call it once per transport: ``register("pkg.transport:Cls",
        name="x")`` names the class by its import path, which flowplug imports the first
        time transport ``x`` is selected or all are listed (so a runner imports only the
        transport it uses); ``register(Cls)`` passes the class itself. The class must
        subclass :class:`flowplug.Transport` and have a lower-case ``name`` attribute
        (equal to ``name=``) not used by another plugin; ``register`` raises
        :class:`flowplug.PluginError` otherwise (for a path: when the class is imported).
    :returns: nothing; every plugin's implementation is called.

    Example::

        @flowplug.hookimpl
        def flowplug_register_transports(register):
            register("flowplug_zmq.transport:ZmqTransport", name="zmq")
    """


# -------------------------------------------------------------------------
# Observer hooks
# -------------------------------------------------------------------------


@hookspec
# ``runner`` is a flowplug.Runner; typed Any because runner.py imports the plugin manager,
# which imports this module: naming Runner here, even for type checkers, closes a circle.
def flowplug_runner_stats(runner: Any, stats: RunnerStats) -> None:
    """Receive a runner's statistics: to export them (Prometheus, TensorBoard, a log).

    Called every :data:`flowplug.stats.HOOK_INTERVAL` seconds (10) while a runner (or a
    ``ParallelMap``) runs, from a thread of its own, and once more when it closes, from
    the thread that closes it. A runner starts its timer only when some plugin implements
    this hook. Never called on the per-datapoint path.

    :param runner: the :class:`flowplug.Runner` (or ``ParallelMap``); read it, do not
        iterate or close it.
    :param stats: what ``runner.stats()`` returns; ``stats.as_dict()`` gives plain types.
    :returns: nothing; every plugin's implementation is called. An exception raised on
        the timer is logged to the ``flowplug`` logger and the runner goes on; one raised
        at close propagates from ``close()``.

    Example::

        @flowplug.hookimpl
        def flowplug_runner_stats(runner, stats):
            gauge.labels(runner.transport_name).set(stats.recent_items_per_s)
    """
