"""The Kafka side of the bridge: one thread, one transaction at a time, nothing ahead of Kafka.

The guarantee, in three sentences:

1. Every consumed record is judged at once, without I/O (:func:`service.intake.judge_record`):
   a new request becomes a changelog record, an invalid one a dead letter, a re-send
   nothing; the engine's effects (state changes, results, dead letters with their
   tombstones) join the same batch (:class:`~service.kafka.effects.Effect`).
2. Each batch is one Kafka transaction that also commits the consumer's positions with
   the group's metadata, so a zombie is fenced, and only after its commit does the engine
   learn of new requests or see its effects resolve: nothing is submitted before its
   request is durable, no offset moves before its record's fate is
   (:class:`~service.kafka.transaction.Transaction`).
3. An abort that repeats, or a lost partition, drops the in-memory state and rebuilds it
   from Kafka, reading the changelog only up to an end no open transaction hides
   (:class:`~service.kafka.ownership.Ownership`, :mod:`service.kafka.restore`).

Where things live:

- :mod:`~service.kafka.io` — :class:`~service.kafka.io.KafkaIO`, the thread: the consume
  loop, the engine's commands, pausing, rebalance callbacks; it composes the rest.
- :mod:`~service.kafka.transaction` — the transactional producer: produce, send offsets,
  commit; abort, then retry the effects or reset the partitions.
- :mod:`~service.kafka.ownership` — the assigned partitions: epochs, pending ids, dedupe
  windows; acquire (committed offsets, then a stable restore), release, reset.
- :mod:`~service.kafka.restore` — reading the state topics back, never past an open
  transaction.
- :mod:`~service.kafka.pending_ids` — the thread's compact copy of a partition's pending
  ids and their bytes.
- :mod:`~service.kafka.effects` — what crosses to and from the engine: ``Effect``,
  ``OutRecord``, ``Channel`` / ``KafkaEdge``, ``EngineHooks``.
- :mod:`~service.kafka.calls` — retrying retriable librdkafka calls, bounding ones that
  may hang; :mod:`~service.kafka.errors` — the errors and which codes are retriable.
- :mod:`~service.kafka.settings` — ``KafkaSettings`` and the clients' error log.
- :mod:`~service.kafka.topics` — the topics: names, specs, creation and checks.

The records themselves (documents, states, results, dead letters, tombstones, dedupe
marks) are built in one place outside the package, :mod:`service.outbox`.
"""
