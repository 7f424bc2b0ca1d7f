"""Registers the ``thread`` transport (hookimpls only; cheap to import)."""

import flowplug


@flowplug.hookimpl
def flowplug_register_transports(register):
    from .transport import ThreadTransport  # imported here so that loading plugin.py stays cheap

    register(ThreadTransport)
