"""The Kafka side's settings and its clients' error logging.

:class:`KafkaSettings` is the slice of :class:`service.config.Settings` the Kafka thread
uses (built by :func:`service.app.kafka_settings`); :class:`KafkaErrorLog` turns each
librdkafka client error into one structured log event.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import structlog
from confluent_kafka import KafkaError

from service.intake import DEFAULT_MAX_HEADER_BYTES
from service.outcomes import DEFAULT_DEAD_LETTER_BYTES

log = structlog.get_logger(__name__)


@dataclass(slots=True)
class KafkaSettings:
    """What the Kafka edge needs to know (a slice of service.config.Settings)."""

    common: dict[str, Any]
    group_id: str
    instance_id: str
    input_topic: str
    result_topic: str
    dead_letter_topic: str
    changelog_topic: str
    documents_topic: str
    dedupe_topic: str
    dedupe_window_s: float
    commit_interval_s: float
    max_pending: int
    #: Backpressure: bytes the pending entries may hold (BRIDGE_MEMORY_BUDGET_MB's share).
    max_pending_bytes: int
    #: The producer's message.max.bytes (the largest topic limit the bridge writes to).
    producer_max_bytes: int
    max_request_bytes: int
    max_document_bytes: int
    restore_timeout_s: float = 120.0
    transaction_timeout_ms: int = 60_000
    #: BRIDGE_MAX_HEADER_BYTES: a record's key, and its headers together, at most this.
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
    #: The largest dead letter the dead-letter topic takes (its record limit).
    dead_letter_max_bytes: int = DEFAULT_DEAD_LETTER_BYTES
    #: Commit once the batch's records hold this many bytes (memory).
    max_batch_bytes: int = 32 * 1024 * 1024
    #: How long a revoke waits for submits in flight on the revoked partitions.
    revoke_grace_s: float = 15.0
    #: Join with group.instance.id = instance_id (only when that id is stable across restarts).
    static_membership: bool = False
    extra_consumer: dict[str, Any] = field(default_factory=dict)
    extra_producer: dict[str, Any] = field(default_factory=dict)


class KafkaErrorLog:
    """librdkafka's error callback: every client error becomes a structured log event.

    Authentication failures get their own event and say what to fix; the last
    error is kept so that a start-up failure can name its cause.
    """

    def __init__(self, client: str) -> None:
        self.client = client
        self.last: str | None = None
        self.auth_failed = False

    def __call__(self, err: KafkaError) -> None:
        self.last = err.str()
        if err.code() in (KafkaError._AUTHENTICATION, KafkaError.SASL_AUTHENTICATION_FAILED):
            self.auth_failed = True
            log.error(
                "kafka_authentication_failed",
                client=self.client,
                error=err.str(),
                action="Kafka refused the credentials: check KAFKA_SASL_USERNAME / "
                "KAFKA_SASL_PASSWORD (the Secret) and KAFKA_SASL_MECHANISM",
            )
        elif err.fatal():
            log.critical("kafka_fatal_error", client=self.client, error=err.str())
        else:
            log.warning(
                "kafka_client_error",
                client=self.client,
                error=err.str(),
                action="librdkafka retries by itself; check the brokers if it persists",
            )
