"""The hooks a flowplug plugin can implement.

A plugin is a module named by an entry point in the group ``flowplug``::

    [project.entry-points.flowplug]
    mytransport = "my_package.plugin"

and implements hooks with :data:`flowplug.hookimpl`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from collections.abc import Callable

    from .transport import Transport

hookspec = pluggy.HookspecMarker("flowplug")
hookimpl = pluggy.HookimplMarker("flowplug")


# -------------------------------------------------------------------------
# Registration hooks
# -------------------------------------------------------------------------


@hookspec
def flowplug_register_transports(register: Callable[[type[Transport]], None]) -> None:
    """Register the transports this plugin provides.

    Called once per process, the first time flowplug needs the list of transports
    (``fp.available_transports()``, ``fp.get_transport()``, or a ``Runner`` start).
    Never called on the per-datapoint path.

    :param register: call ``register(TransportClass)`` once per transport. The class
        must subclass :class:`flowplug.Transport` and have a lower-case ``name``
        attribute not used by another plugin; ``register`` raises
        :class:`flowplug.PluginError` otherwise.
    :returns: nothing; every plugin's implementation is called.

    Example::

        @flowplug.hookimpl
        def flowplug_register_transports(register):
            register(ZmqTransport)
    """
