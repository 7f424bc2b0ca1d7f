"""Registers the ``shm`` transport (hookimpls only; cheap to import)."""

import flowplug


@flowplug.hookimpl
def flowplug_register_transports(register):
    from .transport import ShmTransport  # imported here so that loading plugin.py stays cheap

    register(ShmTransport)
