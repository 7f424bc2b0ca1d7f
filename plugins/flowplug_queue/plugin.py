"""Registers the ``queue`` transport (hookimpls only; cheap to import)."""

import flowplug


@flowplug.hookimpl
def flowplug_register_transports(register):
    # By its path: flowplug imports the transport module only when 'queue' is selected.
    register("flowplug_queue.transport:QueueTransport", name="queue")
