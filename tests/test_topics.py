"""Topics at start-up: created with the configs they need, or checked and refused in one line.

Pure checks first (no broker), then the real broker: every test names its own
topics (a unique group id and topic names) and deletes them afterwards.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException, Producer
from confluent_kafka.admin import (  # type: ignore[attr-defined]
    AdminClient,
    ConfigResource,
    NewTopic,
    ResourceType,
)

from service.config import Settings
from service.kafka.topics import (
    DEAD_LETTER_MAX_BYTES,
    DEDUPE_RETENTION_MARGIN_MS,
    KAFKA_DEFAULT_MAX_MESSAGE_BYTES,
    RECORD_MARGIN_BYTES,
    Need,
    TopicError,
    TopicLayout,
    TopicSpec,
    _unmet,
    ensure_topics,
    producer_max_message_bytes,
    record_bytes,
    record_limits,
    request_record_bytes,
    topic_specs,
)
from tests.fixtures.stack import new_id, wait_for

REPO = Path(__file__).resolve().parents[1]
MiB = 1024 * 1024


class RecordedErrors:
    """The admin client's error callback (the bridge passes settings.KafkaErrorLog)."""

    def __init__(self) -> None:
        self.last: str | None = None
        self.auth_failed = False

    def __call__(self, err: KafkaError) -> None:
        self.last = err.str()


def _settings(group: str, **env: Any) -> Settings:
    return Settings(
        BRIDGE_GROUP_ID=group,
        BRIDGE_INPUT_TOPIC=f"{group}.requests",
        BRIDGE_RESULT_TOPIC=f"{group}.results",
        BRIDGE_DEAD_LETTER_TOPIC=f"{group}.dead-letters",
        **env,
    )


# --------------------------------------------------------------------------- without a broker


def test_specs_cover_every_topic_and_co_partition_the_state_topics() -> None:
    settings = _settings("spec")
    specs = {s.role: s for s in topic_specs(settings)}
    assert list(specs) == ["input", "results", "dead_letters", "changelog", "documents", "dedupe"]
    assert topic_specs(settings)[0].role == "input"
    assert {r for r, s in specs.items() if s.co_partitioned} == {
        "input",
        "changelog",
        "documents",
        "dedupe",
    }
    assert specs["changelog"].name == "spec.pending-changelog"
    assert specs["documents"].name == "spec.pending-documents"
    assert specs["dedupe"].name == "spec.dedupe"
    assert specs["dedupe"].config["retention.ms"] == str(86_400_000 + DEDUPE_RETENTION_MARGIN_MS)
    # The producer can write whatever any topic the bridge creates can hold.
    biggest = max(int(s.config.get("max.message.bytes", 0)) for s in specs.values())
    assert producer_max_message_bytes(settings) == biggest
    assert request_record_bytes(settings) == 2 * settings.max_request_bytes + MiB


def test_the_results_topic_has_no_need_and_follows_its_setting() -> None:
    """A small results topic is not an error: the engine dead-letters what does not fit."""
    specs = {s.role: s for s in topic_specs(_settings("r", BRIDGE_MAX_RESULT_BYTES=3 * MiB))}
    assert specs["results"].needs == ()
    assert specs["results"].config["max.message.bytes"] == str(3 * MiB)


def test_unmet_needs_name_topic_setting_value_and_the_value_needed() -> None:
    spec = TopicSpec(role="dedupe", name="g.dedupe", label="dedupe topic", co_partitioned=True)
    policy = Need("cleanup.policy", "compact,delete")
    assert _unmet(spec, policy, "delete,compact") is None
    assert _unmet(spec, policy, " compact , delete") is None
    line = _unmet(spec, policy, "compact")
    assert line is not None
    assert line.startswith(
        "dedupe topic g.dedupe has cleanup.policy=compact; it needs compact,delete"
    )
    assert "--add-config cleanup.policy=[compact,delete]" in line
    retention = Need("retention.ms", "1000", at_least=True, why="BRIDGE_DEDUPE_WINDOW_S=1")
    assert _unmet(spec, retention, "-1") is None  # unlimited
    assert _unmet(spec, retention, "1000") is None
    assert _unmet(spec, retention, "999") == (
        "dedupe topic g.dedupe has retention.ms=999; it needs at least 1000 "
        "(BRIDGE_DEDUPE_WINDOW_S=1); fix it with kafka-configs --alter --entity-type topics "
        "--entity-name g.dedupe --add-config retention.ms=1000"
    )
    window = Need(
        "retention.ms", "7200000", at_least=True, instead=lambda found: f"or use {found // 1000}"
    )
    line = _unmet(spec, window, "3600000")
    assert line is not None
    assert line.endswith("--add-config retention.ms=7200000, or use 3600")


def test_record_limits_take_the_smaller_of_topic_and_producer_less_framing() -> None:
    layout = TopicLayout(
        partitions=3,
        names={"results": "r", "dead_letters": "d"},
        max_message_bytes={"r": KAFKA_DEFAULT_MAX_MESSAGE_BYTES, "d": 50 * MiB},
    )
    limits = record_limits(layout, producer_max_bytes=20 * MiB)
    assert set(limits) == {"r", "d"}
    assert 1_000_000 < limits["r"] < KAFKA_DEFAULT_MAX_MESSAGE_BYTES
    assert 19 * MiB < limits["d"] < 20 * MiB  # the producer's limit is the smaller one
    assert record_bytes(b"key", b"value", [("h", "é"), ("n", None), ("b", b"12")]) == 15


# --------------------------------------------------------------------------- on the broker


@pytest.fixture
def group(kafka_admin: AdminClient) -> Iterator[str]:
    """A unique group id; every topic named after it is deleted afterwards."""
    name = new_id("topics")
    yield name
    doomed = [t for t in kafka_admin.list_topics(timeout=10).topics if t.startswith(name)]
    if doomed:
        for fut in kafka_admin.delete_topics(doomed, operation_timeout=30).values():
            with contextlib.suppress(Exception):
                fut.result(timeout=30)


@pytest.fixture
def ensure(kafka_bootstrap: str) -> Callable[[Settings], TopicLayout]:
    def _ensure(settings: Settings) -> TopicLayout:
        common = {"bootstrap.servers": kafka_bootstrap}
        return ensure_topics(settings, common=common, errors=RecordedErrors(), timeout_s=30)

    return _ensure


def _create(
    admin: AdminClient, name: str, *, partitions: int, config: Mapping[str, str] | None = None
) -> None:
    topic = NewTopic(
        name, num_partitions=partitions, replication_factor=1, config=dict(config or {})
    )
    admin.create_topics([topic], operation_timeout=30)[name].result(timeout=30)

    def visible() -> bool:
        md = admin.list_topics(topic=name, timeout=5).topics.get(name)
        return md is not None and md.error is None and len(md.partitions) == partitions

    wait_for(visible, 30, interval_s=0.1, message=f"topic {name} visible")


def _precreate_all(
    admin: AdminClient,
    settings: Settings,
    *,
    partitions: int = 2,
    overrides: Mapping[str, Mapping[str, str]] | None = None,
) -> None:
    """Create every topic as an operator would, from the specs, with some configs changed."""
    for spec in topic_specs(settings):
        config = {**spec.config, **(overrides or {}).get(spec.role, {})}
        _create(admin, spec.name, partitions=partitions, config=config)


def _configs(admin: AdminClient, name: str) -> dict[str, str]:
    resource = ConfigResource(ResourceType.TOPIC, name)
    entries = admin.describe_configs([resource])[resource].result(timeout=30)
    return {k: e.value for k, e in entries.items()}


def test_creates_every_topic_with_its_configs(
    kafka_admin: AdminClient, group: str, ensure: Callable[[Settings], TopicLayout]
) -> None:
    settings = _settings(
        group,
        BRIDGE_TOPIC_PARTITIONS=3,
        BRIDGE_MAX_REQUEST_BYTES=4 * MiB,
        BRIDGE_MAX_RESULT_BYTES=5 * MiB,
        BRIDGE_DEDUPE_WINDOW_S=600,
    )
    layout = ensure(settings)
    specs = {s.role: s.name for s in topic_specs(settings)}
    assert set(layout.created) == set(specs.values())
    assert layout.partitions == 3
    md = kafka_admin.list_topics(timeout=10).topics
    assert {name: len(md[name].partitions) for name in specs.values()} == dict.fromkeys(
        specs.values(), 3
    )

    found = {role: _configs(kafka_admin, name) for role, name in specs.items()}
    assert found["input"]["max.message.bytes"] == str(9 * MiB)
    assert found["results"]["max.message.bytes"] == str(5 * MiB)
    assert found["dead_letters"]["max.message.bytes"] == str(DEAD_LETTER_MAX_BYTES)
    assert found["changelog"]["cleanup.policy"] == "compact"
    assert found["changelog"]["min.cleanable.dirty.ratio"] == "0.1"
    assert found["changelog"]["delete.retention.ms"] == "3600000"
    assert found["documents"]["cleanup.policy"] == "compact"
    assert found["documents"]["max.message.bytes"] == str(9 * MiB)
    assert set(found["dedupe"]["cleanup.policy"].split(",")) == {"compact", "delete"}
    assert found["dedupe"]["retention.ms"] == str(600_000 + DEDUPE_RETENTION_MARGIN_MS)
    for configs in found.values():
        assert configs["compression.type"] == "producer"  # batches stored as zstd-compressed
    assert layout.max_message_bytes[specs["results"]] == 5 * MiB

    # A second start finds them all, creates nothing, and passes the checks even when it may not
    # create anything.
    again = ensure(settings.model_copy(update={"create_topics": False}))
    assert again.created == ()
    assert again.partitions == 3


def test_delete_policy_changelog_is_refused_in_one_line(
    kafka_admin: AdminClient, group: str, ensure: Callable[[Settings], TopicLayout]
) -> None:
    settings = _settings(group, BRIDGE_CREATE_TOPICS=False)
    _precreate_all(kafka_admin, settings, overrides={"changelog": {"cleanup.policy": "delete"}})
    with pytest.raises(TopicError) as caught:
        ensure(settings)
    message = str(caught.value)
    assert message.startswith(
        f"changelog {group}.pending-changelog has cleanup.policy=delete; it needs compact"
    )
    assert "\n" not in message


def test_cli_run_stops_with_one_line_for_a_delete_policy_changelog(
    kafka_admin: AdminClient, kafka_bootstrap: str, group: str
) -> None:
    settings = _settings(group)
    _precreate_all(kafka_admin, settings, overrides={"changelog": {"cleanup.policy": "delete"}})
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": os.environ.get("HOME", "/tmp"),
        "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "DOCUTRAY_API_KEY": "dtk_topics_test_key",
        "DOCUTRAY_BASE_URL": "http://127.0.0.1:9",
        "BRIDGE_GROUP_ID": group,
        "BRIDGE_INPUT_TOPIC": settings.input_topic,
        "BRIDGE_RESULT_TOPIC": settings.result_topic,
        "BRIDGE_DEAD_LETTER_TOPIC": settings.dead_letter_topic,
        "BRIDGE_CREATE_TOPICS": "false",
        "BRIDGE_METRICS_PORT": "0",
        "BRIDGE_LOG_FORMAT": "json",
        "BRIDGE_LOG_LEVEL": "warning",
    }
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "run"],
        env=env,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=90,
        check=False,
    )
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert lines == [
        f"error: changelog {group}.pending-changelog has cleanup.policy=delete; it needs compact "
        "(pending conversions are kept by compaction, never deleted by age); fix it with "
        f"kafka-configs --alter --entity-type topics --entity-name {group}.pending-changelog "
        "--add-config cleanup.policy=compact"
    ], result.stderr


def test_missing_topics_without_creation_are_named(
    kafka_admin: AdminClient, group: str, ensure: Callable[[Settings], TopicLayout]
) -> None:
    settings = _settings(group, BRIDGE_CREATE_TOPICS=False)
    _create(
        kafka_admin, settings.input_topic, partitions=2, config={"max.message.bytes": "20000000"}
    )
    with pytest.raises(TopicError) as caught:
        ensure(settings)
    message = str(caught.value)
    assert message.startswith("topics missing and BRIDGE_CREATE_TOPICS=false: ")
    assert f"{group}.pending-changelog (changelog)" in message
    assert f"{group}.dedupe (dedupe topic)" in message
    assert settings.input_topic + " " not in message
    assert {t for t in kafka_admin.list_topics(timeout=10).topics if t.startswith(group)} == {
        settings.input_topic
    }, "nothing is created when creation is off"


def test_input_with_a_too_small_max_message_bytes_is_refused(
    kafka_admin: AdminClient, group: str, ensure: Callable[[Settings], TopicLayout]
) -> None:
    """Found at Kafka's default (1 MB) while the bridge accepts 16 MB requests: the upstream
    producers could never write the requests the bridge is configured for."""
    settings = _settings(group)  # creation on: the other topics are created, the input checked
    _create(
        kafka_admin,
        settings.input_topic,
        partitions=2,
        config={"max.message.bytes": str(KAFKA_DEFAULT_MAX_MESSAGE_BYTES)},
    )
    with pytest.raises(TopicError) as caught:
        ensure(settings)
    needed = settings.max_request_bytes + RECORD_MARGIN_BYTES
    assert str(caught.value) == (
        f"input {settings.input_topic} has max.message.bytes={KAFKA_DEFAULT_MAX_MESSAGE_BYTES}; "
        f"it needs at least {needed} (BRIDGE_MAX_REQUEST_BYTES=16777216 plus 65536 for key and "
        f"headers); fix it with kafka-configs --alter --entity-type topics --entity-name "
        f"{settings.input_topic} --add-config max.message.bytes={needed}, "
        f"or lower BRIDGE_MAX_REQUEST_BYTES to {KAFKA_DEFAULT_MAX_MESSAGE_BYTES - 65536} at most"
    )


def test_short_dedupe_retention_is_refused(
    kafka_admin: AdminClient, group: str, ensure: Callable[[Settings], TopicLayout]
) -> None:
    settings = _settings(group, BRIDGE_CREATE_TOPICS=False, BRIDGE_DEDUPE_WINDOW_S=7200)
    _precreate_all(kafka_admin, settings, overrides={"dedupe": {"retention.ms": "3600000"}})
    with pytest.raises(
        TopicError,
        match=r"^dedupe topic .* has retention\.ms=3600000; it needs "
        r"at least 7200000 \(BRIDGE_DEDUPE_WINDOW_S=7200\); .*"
        r", or lower BRIDGE_DEDUPE_WINDOW_S to 3600 at most$",
    ):
        ensure(settings)


def test_partition_mismatch_says_to_add_partitions_together(
    kafka_admin: AdminClient, group: str, ensure: Callable[[Settings], TopicLayout]
) -> None:
    settings = _settings(group)
    _create(
        kafka_admin, settings.input_topic, partitions=4, config={"max.message.bytes": "40000000"}
    )
    _create(kafka_admin, settings.changelog, partitions=2, config={"cleanup.policy": "compact"})
    with pytest.raises(TopicError) as caught:
        ensure(settings)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(
        f"changelog {settings.changelog} has 2 partitions but input {settings.input_topic} has 4"
    )
    assert (
        "With every replica of the bridge stopped, add partitions to the input and every "
        "co-partitioned topic together" in message
    )
    for name in (settings.input_topic, settings.changelog, f"{group}.pending-documents"):
        assert name in message
    assert "up to 4" in message
    assert "do not delete or recreate the changelog" in message
    # The topics the bridge created took the input's count.
    md = kafka_admin.list_topics(timeout=10).topics
    assert len(md[f"{group}.dedupe"].partitions) == 4


def test_results_topic_at_kafkas_default_is_accepted_and_its_limit_holds(
    kafka_admin: AdminClient,
    kafka_bootstrap: str,
    group: str,
    ensure: Callable[[Settings], TopicLayout],
) -> None:
    """Pre-created at 1048588 (below BRIDGE_MAX_RESULT_BYTES): start-up goes on, and the limit
    it reports is one the broker really honours: a record of exactly that size (incompressible,
    zstd) is accepted, a record just over the topic's limit is refused."""
    settings = _settings(group)
    _create(
        kafka_admin,
        settings.result_topic,
        partitions=2,
        config={"max.message.bytes": str(KAFKA_DEFAULT_MAX_MESSAGE_BYTES)},
    )
    layout = ensure(settings)
    assert settings.result_topic not in layout.created
    assert layout.max_message_bytes[settings.result_topic] == KAFKA_DEFAULT_MAX_MESSAGE_BYTES
    limits = record_limits(layout, producer_max_bytes=producer_max_message_bytes(settings))
    assert set(limits) == {settings.result_topic, settings.dead_letter_topic}
    limit = limits[settings.result_topic]
    assert 1_000_000 < limit < KAFKA_DEFAULT_MAX_MESSAGE_BYTES
    assert limits[settings.dead_letter_topic] < DEAD_LETTER_MAX_BYTES

    producer = Producer(
        {
            "bootstrap.servers": kafka_bootstrap,
            "compression.type": "zstd",
            "message.max.bytes": 4 * MiB,
            "enable.idempotence": True,
        }
    )
    outcomes: dict[str, KafkaError | None] = {}

    def report(name: str) -> Callable[[KafkaError | None, Any], None]:
        def _report(err: KafkaError | None, _msg: Any) -> None:
            outcomes[name] = err

        return _report

    key = b"request-1"
    headers: list[tuple[str, str | bytes | None]] = [("content-type", b"application/json")]
    fits = os.urandom(limit - record_bytes(key, b"", headers))
    assert record_bytes(key, fits, headers) == limit
    producer.produce(settings.result_topic, fits, key, headers=headers, on_delivery=report("fits"))
    producer.produce(
        settings.result_topic,
        os.urandom(KAFKA_DEFAULT_MAX_MESSAGE_BYTES + 1),
        on_delivery=report("too big"),
    )
    wait_for(lambda: producer.flush(1) == 0, 30, message="deliveries reported")
    assert outcomes["fits"] is None, outcomes["fits"]
    too_big = outcomes["too big"]
    assert too_big is not None
    assert too_big.code() == KafkaError.MSG_SIZE_TOO_LARGE, too_big
    with contextlib.suppress(KafkaException):
        producer.purge()
