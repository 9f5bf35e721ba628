"""Application services: the handlers, the command runner, the reactor, the process manager and
the composition root, bound to the registry; running the service here (`runtime.py`)."""
