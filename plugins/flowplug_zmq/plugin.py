"""Registers the ``zmq`` transport (hookimpls only; cheap to import)."""

import flowplug


@flowplug.hookimpl
def flowplug_register_transports(register):
    # By its path: flowplug imports the transport module only when 'zmq' is selected.
    register("flowplug_zmq.transport:ZmqTransport", name="zmq")
