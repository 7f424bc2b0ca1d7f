"""Registers the ``ray`` transport (hookimpls only; cheap to import, does not import Ray)."""

import flowplug


@flowplug.hookimpl
def flowplug_register_transports(register):
    from .transport import RayTransport  # imports flowplug_ray, not yet ray itself

    register(RayTransport)
