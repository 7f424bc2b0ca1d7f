"""Registers the ``ray`` transport (hookimpls only; cheap to import, does not import Ray)."""

import flowplug


@flowplug.hookimpl
def flowplug_register_transports(register):
    # By its path: flowplug imports flowplug_ray.transport (not yet ray itself) only when
    # 'ray' is selected or the transports are listed.
    register("flowplug_ray.transport:RayTransport", name="ray")
