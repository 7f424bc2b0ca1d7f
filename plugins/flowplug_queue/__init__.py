"""The ``queue`` transport: worker processes send through a multiprocessing.Queue."""
