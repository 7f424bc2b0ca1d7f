"""flowplug-example: the ``pipe`` transport, a template for third-party flowplug plugins."""

__version__ = "0.1.0"
