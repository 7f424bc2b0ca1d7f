"""Registers the ``pipe`` transport.

flowplug imports this module (named by the entry point in pyproject.toml) the first time it
needs the list of transports, so it stays cheap: the hook names the transport class by its
import path, and flowplug imports that module only when ``pipe`` is selected (or the
transports are listed).
"""

import flowplug


@flowplug.hookimpl
def flowplug_register_transports(register):
    register("flowplug_example.transport:PipeTransport", name="pipe")
