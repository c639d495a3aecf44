"""Code the tests share, in one place (no tests here).

- ``service_fixtures``: session fixtures that start RabbitMQ, the Cosmos-compatible server and Azurite
  (registered in ``tests/conftest.py``; a service starts only when a test asks for it);
- ``event_taps``: queues bound to a test's exchange that see every published event;
- ``helpers``: Service Bus trigger objects, invoking a function's ``main()``, the CLI as a subprocess,
  hand-built events;
- ``documents``: connection documents seeded into Cosmos and the refresh requests for them;
- ``canaries``: secrets with a canary in them, and what the app let out (the secrets tests);
- ``service_bus``: a recording Service Bus client (the SDK boundary);
- ``cosmos_faults``: failing chosen requests at the Cosmos-compatible server;
- ``host_process``: ``python -m localdev run`` in the background;
- ``crash_points``: the crash-point scenarios (``python -m tests.support.crash_points`` prints
  docs/failure-points.md's table);
- ``failure_table``: the classification table of docs/failure-handling.md;
- ``fleets``: a large mixed fleet of connections;
- ``network``: free/closed ports, connections this process holds;
- ``functions_worker``, ``worker_telemetry``: the real Functions Python worker, driven with the host's
  messages (docs/functions-worker.md).
"""
