"""Registers the ``thread`` transport (hookimpls only; cheap to import)."""

import flowplug


@flowplug.hookimpl
def flowplug_register_transports(register):
    # By its path: flowplug imports the transport module only when 'thread' is selected.
    register("flowplug_thread.transport:ThreadTransport", name="thread")
