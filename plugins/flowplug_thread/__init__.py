"""The ``thread`` transport: workers are threads of the consumer, joined by a queue.Queue."""
