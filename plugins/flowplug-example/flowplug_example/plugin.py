"""Registers the ``pipe`` transport.

flowplug imports this module (named by the entry point in pyproject.toml) the first time it
needs the list of transports, so it stays cheap: the transport module is imported inside
the hook.
"""

import flowplug


@flowplug.hookimpl
def flowplug_register_transports(register):
    from .transport import PipeTransport

    register(PipeTransport)
