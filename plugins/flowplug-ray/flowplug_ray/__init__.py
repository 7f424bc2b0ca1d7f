"""The ``ray`` transport: flowplug workers as Ray actors, datapoints through Ray's object store.

Importing this package does not import Ray; the transport does, when a runner opens it.
"""
