"""The topics the bridge uses: one declarative spec each, created or checked at start-up.

Every topic is one :class:`TopicSpec` in :func:`topic_specs`: its role, how
it is created (configs) and what an existing topic must have (``needs``).
Adding a topic is one entry there.

Start-up, step by step (:func:`ensure_topics`):

1. Wait until Kafka answers (a refused SASL login or an unreachable broker
   ends start-up with one line).
2. The input's partition count is the count: co-partitioned topics (the
   changelog, the documents and the dedupe topic) are written to the same
   partition number as the input record they belong to.
3. Create the missing topics when ``BRIDGE_CREATE_TOPICS=true`` (each with
   its configs), else fail naming them; wait until their metadata is visible.
4. Read every topic's configs (``DescribeConfigs``) and partition counts,
   whether the bridge just created the topic or found it, and fail with one
   line naming the first topic, setting, value found and value needed.
5. Return a :class:`TopicLayout`: the partition count and each topic's
   ``max.message.bytes``, from which :func:`record_limits` gives the largest
   record the engine may produce to the results and dead-letter topics.

A results topic whose ``max.message.bytes`` is below
``BRIDGE_MAX_RESULT_BYTES`` is not an error: a result that does not fit
becomes a dead letter ``result_too_large`` instead.

Compression: output records are compressed by the producer (zstd, set in
the Kafka edge's producer configuration). The topics keep Kafka's default
``compression.type=producer``, so brokers store batches as the producer
compressed them and never recompress; ``max.message.bytes`` applies to the
compressed batch, which makes the uncompressed limits here conservative.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import structlog
from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import (  # type: ignore[attr-defined]
    AdminClient,
    ConfigResource,
    NewTopic,
    ResourceType,
)

from service.config import Settings
from service.errors import BridgeError

log = structlog.get_logger(__name__)

Role = Literal[
    "input", "results", "dead_letters", "changelog", "documents", "dedupe", "completions"
]

#: Kafka's own default for a topic's ``max.message.bytes`` (1 MiB plus the log overhead).
KAFKA_DEFAULT_MAX_MESSAGE_BYTES = 1_048_588
#: Room for a record's key, headers and framing beside a value of the largest accepted size.
RECORD_MARGIN_BYTES = 64 * 1024
#: ``max.message.bytes`` of a dead-letter topic the bridge creates: a bounded dead letter
#: (the error, ids and an excerpt of the original record) fits with room to spare.
DEAD_LETTER_MAX_BYTES = 2 * 1024 * 1024
#: The dedupe topic keeps ids this much longer than the window (producer clocks drift).
DEDUPE_RETENTION_MARGIN_MS = 3_600_000

#: Compacted topics the bridge restores from: compact eagerly and drop tombstones after an
#: hour. A restore reads the whole uncompacted tail, so a short one keeps restores fast.
_EAGER_COMPACTION = {
    "min.compaction.lag.ms": "0",
    "segment.ms": "600000",
    "min.cleanable.dirty.ratio": "0.1",
    "delete.retention.ms": "3600000",
}


class TopicError(BridgeError):
    """A topic is missing, cannot be created or read, or has a setting the bridge cannot use."""


class ClientErrors(Protocol):
    """librdkafka's error callback that remembers the last error (``KafkaErrorLog``)."""

    last: str | None
    auth_failed: bool

    def __call__(self, err: KafkaError) -> None:
        """Record (and log) one client error."""


@dataclass(frozen=True, slots=True)
class Need:
    """A config an existing topic must have: exactly ``value``, or at least it (``at_least``).

    ``cleanup.policy`` is compared as a set (``delete,compact`` is ``compact,delete``);
    ``at_least`` compares integers, with ``-1`` (unlimited) meeting any minimum.
    """

    setting: str
    value: str
    at_least: bool = False
    #: Why the value is needed, appended to the error (e.g. which setting it follows).
    why: str = ""
    #: The other way out, given the value found (an integer): e.g. which setting to lower.
    instead: Callable[[int], str | None] | None = None


@dataclass(frozen=True, slots=True)
class TopicSpec:
    """One topic the bridge uses: how it is created and what an existing one must have."""

    role: Role
    name: str
    #: How the topic is named in errors ("changelog", "results topic").
    label: str
    #: Written to the input record's partition number: needs the input's partition count.
    co_partitioned: bool
    #: Configs set when the bridge creates the topic.
    config: Mapping[str, str] = field(default_factory=dict)
    #: Configs checked on the topic as it is (created or found).
    needs: tuple[Need, ...] = ()


def request_record_bytes(settings: Settings) -> int:
    """``max.message.bytes`` of topics that carry whole requests (input, documents).

    Twice the largest accepted request plus 1 MiB: room for a stored original in
    JSON with its bytes in base64, and for a record somewhat over
    ``BRIDGE_MAX_REQUEST_BYTES`` to reach the bridge and become a ``too_large`` dead
    letter instead of being refused to its producer.
    """
    return settings.max_request_bytes * 2 + 1024 * 1024


def producer_max_message_bytes(settings: Settings) -> int:
    """The producer's ``message.max.bytes``: the largest record the bridge writes anywhere."""
    return max(
        request_record_bytes(settings),
        settings.max_result_bytes,
        DEAD_LETTER_MAX_BYTES,
    )


def documents_topic(settings: Settings) -> str:
    """The compacted topic that holds the original request records while they are pending."""
    return f"{settings.group_id}.pending-documents"


def dedupe_topic(settings: Settings) -> str:
    """The compacted, expiring topic of request ids that finished within the dedupe window."""
    return f"{settings.group_id}.dedupe"


def topic_specs(settings: Settings) -> list[TopicSpec]:
    """Every topic the bridge uses, the input first."""
    return [
        _input_spec(settings),
        _results_spec(settings),
        _dead_letters_spec(settings),
        _changelog_spec(settings),
        _documents_spec(settings),
        _dedupe_spec(settings),
        *_completions_specs(settings),
    ]


def _input_spec(settings: Settings) -> TopicSpec:
    """The input topic: large enough for the largest request."""
    requests = request_record_bytes(settings)
    max_request = settings.max_request_bytes
    return TopicSpec(
        role="input",
        name=settings.input_topic,
        label="input",
        co_partitioned=True,
        config={"max.message.bytes": str(requests)},
        needs=(
            Need(
                "max.message.bytes",
                str(max_request + RECORD_MARGIN_BYTES),
                at_least=True,
                why=f"BRIDGE_MAX_REQUEST_BYTES={max_request} plus "
                f"{RECORD_MARGIN_BYTES} for key and headers",
                instead=lambda found: _lower_to(
                    "BRIDGE_MAX_REQUEST_BYTES", found - RECORD_MARGIN_BYTES, minimum=1024
                ),
            ),
        ),
    )


def _results_spec(settings: Settings) -> TopicSpec:
    """The results topic (a result over its limit is dead-lettered instead)."""
    return TopicSpec(
        role="results",
        name=settings.result_topic,
        label="results topic",
        co_partitioned=False,
        # No need: a result over the topic's limit becomes a `result_too_large` dead letter.
        config={"max.message.bytes": str(settings.max_result_bytes)},
    )


def _dead_letters_spec(settings: Settings) -> TopicSpec:
    """The dead-letter topic: room for a bounded dead letter."""
    return TopicSpec(
        role="dead_letters",
        name=settings.dead_letter_topic,
        label="dead-letter topic",
        co_partitioned=False,
        config={"max.message.bytes": str(DEAD_LETTER_MAX_BYTES)},
        needs=(
            Need(
                "max.message.bytes",
                str(KAFKA_DEFAULT_MAX_MESSAGE_BYTES),
                at_least=True,
                why="Kafka's default, room for a bounded dead letter",
            ),
        ),
    )


def _changelog_spec(settings: Settings) -> TopicSpec:
    """The pending changelog: compacted, never deleted by age."""
    return TopicSpec(
        role="changelog",
        name=settings.changelog,
        label="changelog",
        co_partitioned=True,
        config={"cleanup.policy": "compact", **_EAGER_COMPACTION},
        needs=(
            Need(
                "cleanup.policy",
                "compact",
                why="pending conversions are kept by compaction, never deleted by age",
            ),
        ),
    )


def _documents_spec(settings: Settings) -> TopicSpec:
    """The documents topic: each pending request's document, compacted."""
    requests = request_record_bytes(settings)
    max_request = settings.max_request_bytes
    return TopicSpec(
        role="documents",
        name=documents_topic(settings),
        label="documents topic",
        co_partitioned=True,
        config={
            "cleanup.policy": "compact",
            "max.message.bytes": str(requests),
            **_EAGER_COMPACTION,
        },
        needs=(
            Need(
                "cleanup.policy",
                "compact",
                why="pending documents are kept until their outcome, never deleted by age",
            ),
            Need(
                "max.message.bytes",
                str(requests),
                at_least=True,
                why=f"twice BRIDGE_MAX_REQUEST_BYTES={max_request} plus 1 MiB",
                instead=lambda found: _lower_to(
                    "BRIDGE_MAX_REQUEST_BYTES", (found - 1024 * 1024) // 2, minimum=1024
                ),
            ),
        ),
    )


def _dedupe_spec(settings: Settings) -> TopicSpec:
    """The dedupe topic: finished request ids, kept for the dedupe window."""
    window_ms = round(settings.dedupe_window_s * 1000)
    return TopicSpec(
        role="dedupe",
        name=dedupe_topic(settings),
        label="dedupe topic",
        co_partitioned=True,
        config={
            "cleanup.policy": "compact,delete",
            "retention.ms": str(window_ms + DEDUPE_RETENTION_MARGIN_MS),
            "min.compaction.lag.ms": "0",
            "segment.ms": "3600000",
            "min.cleanable.dirty.ratio": "0.1",
            "delete.retention.ms": "3600000",
        },
        needs=(
            Need("cleanup.policy", "compact,delete"),
            Need(
                "retention.ms",
                str(window_ms),
                at_least=True,
                why=f"BRIDGE_DEDUPE_WINDOW_S={settings.dedupe_window_s:g}",
                instead=lambda found: _lower_to("BRIDGE_DEDUPE_WINDOW_S", found // 1000, minimum=1),
            ),
        ),
    )


def completions_topic(settings: Settings) -> str:
    """Webhook completions, produced to the request's partition and read by its owner."""
    return f"{settings.group_id}.completions"


def _completions_specs(settings: Settings) -> list[TopicSpec]:
    """With webhooks on: the co-partitioned completions topic (wake-ups only, kept an hour)."""
    if not settings.webhooks_enabled:
        return []
    return [
        TopicSpec(
            role="completions",
            name=completions_topic(settings),
            label="completions topic",
            co_partitioned=True,
            config={"cleanup.policy": "delete", "retention.ms": "3600000"},
        )
    ]


@dataclass(frozen=True, slots=True)
class TopicLayout:
    """What start-up found: the partition count and each topic's effective configs."""

    #: The input's partition count (every co-partitioned topic has the same).
    partitions: int
    #: Topic name by role.
    names: Mapping[Role, str]
    #: Effective ``max.message.bytes`` by topic name (the topic's own or the broker's default).
    max_message_bytes: Mapping[str, int]
    #: Topics this start-up created.
    created: tuple[str, ...] = ()


def _framing_bytes(limit: int) -> int:
    """Kept free below a limit for record and batch framing, header varints and compression
    overhead (zstd adds a few bytes per 128 KiB block to data it cannot shrink)."""
    return 4096 + limit // 1024


def record_limits(layout: TopicLayout, *, producer_max_bytes: int) -> dict[str, int]:
    """The largest record (key + value + header names and values, uncompressed, in bytes)
    the engine may produce to the results and the dead-letter topic: topic name -> limit.

    The smaller of the topic's ``max.message.bytes`` and the producer's
    ``message.max.bytes``, less a margin for framing. A record over it must not be
    produced: the broker (or librdkafka) would refuse it and abort the transaction.
    Batches stay within it as long as the producer's ``batch.size`` is at most the
    smallest limit (librdkafka's default of 1,000,000 is): a single record larger than
    ``batch.size`` is sent alone.
    """
    limits: dict[str, int] = {}
    for role in ("results", "dead_letters"):
        name = layout.names[role]
        limit = min(layout.max_message_bytes[name], producer_max_bytes)
        limits[name] = limit - _framing_bytes(limit)
    return limits


def record_bytes(
    key: bytes | None, value: bytes | None, headers: Sequence[tuple[str, Any]] | None
) -> int:
    """A record's size as :func:`record_limits` counts it."""
    size = len(key or b"") + len(value or b"")
    for name, header in headers or ():
        size += len(name.encode())
        if isinstance(header, str):
            size += len(header.encode())
        elif isinstance(header, bytes):
            size += len(header)
    return size


def ensure_topics(
    settings: Settings,
    *,
    common: Mapping[str, Any],
    errors: ClientErrors,
    timeout_s: float = 30.0,
) -> TopicLayout:
    """Create missing topics (if allowed), check every topic, return the layout.

    `common` is the librdkafka configuration every client shares (bootstrap
    servers, security); `errors` becomes the admin client's error callback, so
    a refused login is named. Raises :class:`TopicError` (and BridgeError for an
    unreachable or refusing Kafka) with one line; see the module docstring.
    """
    specs = topic_specs(settings)
    conf: dict[str, Any] = {**common, "error_cb": errors}
    admin = AdminClient(conf)
    where = common.get("bootstrap.servers")
    # Step 1.
    _wait_for_kafka(admin, errors, where=where, timeout_s=timeout_s)
    try:
        return _ensure(admin, specs, settings, timeout_s=timeout_s)
    except KafkaException as exc:
        raise BridgeError(f"Kafka at {where}: {exc.args[0].str()}") from None


def _wait_for_kafka(
    admin: AdminClient, errors: ClientErrors, *, where: Any, timeout_s: float
) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            admin.list_topics(timeout=min(5.0, max(0.5, deadline - time.monotonic())))
            return
        except KafkaException as exc:
            admin.poll(0)  # serves the error callback: it knows why
            if errors.auth_failed:
                raise BridgeError(
                    f"Kafka at {where} refused the credentials (SASL authentication failed: "
                    f"{errors.last}); check KAFKA_SASL_USERNAME, KAFKA_SASL_PASSWORD and "
                    "KAFKA_SASL_MECHANISM"
                ) from None
            if time.monotonic() > deadline:
                cause = f"; last broker error: {errors.last}" if errors.last else ""
                raise BridgeError(
                    f"cannot reach Kafka at {where}: {exc.args[0].str()}{cause}; "
                    "check KAFKA_BOOTSTRAP_SERVERS and the network"
                ) from None


def _partition_counts(admin: AdminClient, timeout_s: float) -> dict[str, int]:
    """Partition count of every visible topic (topics with a metadata error left out)."""
    md = admin.list_topics(timeout=timeout_s)
    return {
        name: len(t.partitions) for name, t in md.topics.items() if t.error is None and t.partitions
    }


def _ensure(
    admin: AdminClient, specs: list[TopicSpec], settings: Settings, *, timeout_s: float
) -> TopicLayout:
    input_spec = specs[0]
    counts = _partition_counts(admin, timeout_s)
    # Step 2.
    partitions = counts.get(input_spec.name, settings.topic_partitions)
    # Step 3.
    missing = [s for s in specs if s.name not in counts]
    if missing and not settings.create_topics:
        names = ", ".join(f"{s.name} ({s.label})" for s in missing)
        raise TopicError(
            f"topics missing and BRIDGE_CREATE_TOPICS=false: {names}; create them as the "
            "README's topic table says, or let the bridge create them"
        )
    created = _create(admin, missing, partitions, settings, timeout_s=timeout_s)
    counts = _wait_visible(admin, specs, timeout_s=timeout_s)
    # Step 4.
    configs = _describe(admin, specs, timeout_s=timeout_s)
    for spec in specs:
        for need in spec.needs:
            problem = _unmet(spec, need, configs[spec.name].get(need.setting))
            if problem:
                raise TopicError(problem)
    _check_partitions(specs, counts)
    # Step 5.
    return TopicLayout(
        partitions=counts[input_spec.name],
        names={s.role: s.name for s in specs},
        max_message_bytes={s.name: int(configs[s.name]["max.message.bytes"]) for s in specs},
        created=tuple(created),
    )


def _create(
    admin: AdminClient,
    missing: list[TopicSpec],
    partitions: int,
    settings: Settings,
    *,
    timeout_s: float,
) -> list[str]:
    if not missing:
        return []
    new = [
        NewTopic(
            s.name,
            num_partitions=partitions,
            replication_factor=settings.topic_replication_factor,
            config=dict(s.config),
        )
        for s in missing
    ]
    created: list[str] = []
    for name, fut in admin.create_topics(new, request_timeout=timeout_s).items():
        try:
            fut.result()
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise TopicError(f"cannot create topic {name}: {exc.args[0].str()}") from None
        else:
            created.append(name)
            log.info("topic_created", topic=name, partitions=partitions)
    return created


def _wait_visible(
    admin: AdminClient, specs: list[TopicSpec], *, timeout_s: float
) -> dict[str, int]:
    """Creation is acknowledged before every broker's metadata shows the topics: wait."""
    deadline = time.monotonic() + timeout_s
    while True:
        counts = _partition_counts(admin, timeout_s)
        absent = [s.name for s in specs if s.name not in counts]
        if not absent:
            return counts
        if time.monotonic() > deadline:
            raise TopicError(
                f"topics {', '.join(absent)} not visible {timeout_s:.0f} s after creation; "
                "check the brokers"
            )
        time.sleep(0.1)


def _describe(
    admin: AdminClient, specs: list[TopicSpec], *, timeout_s: float
) -> dict[str, dict[str, str]]:
    resources = [ConfigResource(ResourceType.TOPIC, s.name) for s in specs]
    out: dict[str, dict[str, str]] = {}
    for resource, fut in admin.describe_configs(resources, request_timeout=timeout_s).items():
        try:
            entries = fut.result()
        except KafkaException as exc:
            raise TopicError(
                f"cannot read the configuration of topic {resource.name}: "
                f"{exc.args[0].str()}; the bridge needs DescribeConfigs on its topics"
            ) from None
        out[resource.name] = {k: e.value for k, e in entries.items() if e.value is not None}
    return out


def _as_int(value: str) -> float:
    number = int(value)
    return float("inf") if number < 0 else number


def _unmet(spec: TopicSpec, need: Need, found: str | None) -> str | None:
    """The one-line error when `found` does not meet `need`, else None."""
    if need.at_least:
        met = found is not None and _as_int(found) >= int(need.value)
        wanted = f"at least {need.value}"
    elif need.setting == "cleanup.policy":
        met = found is not None and _policies(found) == _policies(need.value)
        wanted = need.value
    else:
        met = found == need.value
        wanted = need.value
    if met:
        return None
    why = f" ({need.why})" if need.why else ""
    value = f"[{need.value}]" if "," in need.value else need.value
    other = None
    if need.instead is not None and found is not None and found.lstrip("-").isdigit():
        other = need.instead(int(found))
    return (
        f"{spec.label} {spec.name} has {need.setting}={found}; it needs {wanted}{why}; fix it "
        f"with kafka-configs --alter --entity-type topics --entity-name {spec.name} "
        f"--add-config {need.setting}={value}" + (f", {other}" if other else "")
    )


def _lower_to(setting: str, most: int, *, minimum: int) -> str | None:
    return f"or lower {setting} to {most} at most" if most >= minimum else None


def _policies(value: str) -> frozenset[str]:
    return frozenset(p.strip() for p in value.split(",") if p.strip())


def _check_partitions(specs: list[TopicSpec], counts: Mapping[str, int]) -> None:
    input_spec = specs[0]
    together = [s for s in specs if s.co_partitioned]
    expected = counts[input_spec.name]
    for spec in together:
        if counts[spec.name] == expected:
            continue
        target = max(counts[s.name] for s in together)
        names = ", ".join(s.name for s in together)
        raise TopicError(
            f"{spec.label} {spec.name} has {counts[spec.name]} partitions but input "
            f"{input_spec.name} has {expected}: co-partitioned topics need the same count. "
            f"With every replica of the bridge stopped, add partitions to the input and every "
            f"co-partitioned topic together ({names}) up to {target} "
            "(kafka-topics --alter --partitions); do not delete or recreate the changelog, "
            "that throws pending conversions away"
        )
