"""What can go wrong on the Kafka side, and which librdkafka errors pass with time.

:class:`FatalKafkaError` ends the Kafka thread (and the process, which restarts and
restores from the changelog); :class:`StaleEffect` fails one effect whose partition
changed owner. :func:`retriable` is the one place that decides whether a failed call is
tried again (see :mod:`service.kafka.calls`).
"""

from __future__ import annotations

from confluent_kafka import KafkaError

from service.errors import BridgeError


class FatalKafkaError(BridgeError):
    """The producer was fenced or Kafka failed in a way this process cannot recover from."""


class StaleEffect(BridgeError):
    """An effect for a partition this replica no longer owns (or that was reset): dropped."""


class CallHung(Exception):
    """A librdkafka call did not return in time (see :meth:`service.kafka.calls.Calls.bounded`)."""


#: Errors that pass with time (leadership moves, coordinators load, brokers restart), whether
#: or not librdkafka flags them retriable (look-ups such as watermarks never do).
RETRIABLE_CODES = frozenset(
    {
        KafkaError._TIMED_OUT,
        KafkaError._TRANSPORT,
        KafkaError._ALL_BROKERS_DOWN,
        KafkaError._WAIT_COORD,
        KafkaError._UNKNOWN_PARTITION,
        KafkaError.REQUEST_TIMED_OUT,
        KafkaError.NOT_LEADER_FOR_PARTITION,
        KafkaError.LEADER_NOT_AVAILABLE,
        KafkaError.UNKNOWN_TOPIC_OR_PART,
        KafkaError.NOT_COORDINATOR,
        KafkaError.COORDINATOR_NOT_AVAILABLE,
        KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
        KafkaError.CONCURRENT_TRANSACTIONS,
        KafkaError.NOT_ENOUGH_REPLICAS,
        KafkaError.NOT_ENOUGH_REPLICAS_AFTER_APPEND,
        KafkaError.REBALANCE_IN_PROGRESS,
    }
)


def retriable(kerr: KafkaError) -> bool:
    """Whether a later attempt of the failed call may succeed (see :data:`RETRIABLE_CODES`)."""
    return bool(kerr.retriable()) or kerr.code() in RETRIABLE_CODES
