"""Registers the ``shm`` transport (hookimpls only; cheap to import)."""

import flowplug


@flowplug.hookimpl
def flowplug_register_transports(register):
    # By its path: flowplug imports the transport module only when 'shm' is selected.
    register("flowplug_shm.transport:ShmTransport", name="shm")
