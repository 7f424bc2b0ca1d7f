"""The ``zmq`` transport: worker processes PUSH to the consumer's PULL over ipc://."""
