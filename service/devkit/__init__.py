"""The process toolkit shared by the tests, the benchmarks and the demo (no pytest here).

Each module holds one idea; none imports ``tests`` or ``bench``:

- :mod:`~service.devkit.ports`: ``free_port()``, ``free_ports(n)`` on loopback.
- :mod:`~service.devkit.waiting`: ``wait_until(predicate, timeout_s, what)``, the one
  deadline loop (``TimeoutError`` naming what was awaited; :class:`GiveUp` stops at once).
- :mod:`~service.devkit.processes`: child processes: ``read_line`` with a deadline,
  ``stop_process``, :class:`EmulatorProcess`, :class:`BridgeProcess` (env, ports, readiness,
  scrape, stop, kill), :class:`OpsEndpoint` (a bridge's /readyz and /metrics wherever it
  runs), :class:`RedisServer`.
- :mod:`~service.devkit.outcomes`: results and dead letters read back from Kafka (through
  :func:`service.tools.read_outcomes`, the one reader) by a background
  :class:`OutcomeCollector` into compact :class:`SeenOutcome` rows.
- :mod:`~service.devkit.producing`: :class:`PacedProducer`, records at a steady rate in a
  thread (a chaos scenario's load, the soak's, a benchmark's paced arrivals).
- :mod:`~service.devkit.serving`: small loopback HTTP servers (files, webhook receivers).
- :mod:`~service.devkit.history`: the history checker (exactly one acceptable outcome per
  request) and the chaos report rows.
- :mod:`~service.devkit.limiter_replica`: a rate-limiter replica in its own process
  (``python -m service.devkit.limiter_replica CFG``) and :class:`ReplicaProcess` to drive it.
"""
