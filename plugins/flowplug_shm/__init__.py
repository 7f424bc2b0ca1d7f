"""The ``shm`` transport: workers put datapoints in a shared-memory store; ids travel by zmq."""
