"""Hostile bytes from a producer nobody here wrote (issue 11 item 3): kcat, librdkafka's C tool.

kcat sends what Python clients will not: header keys that are not UTF-8, a
file as one record, megabytes of headers. Each hostile record goes to
partition 0 between good requests, on real bridge processes. What must hold:
no bridge process exits, every good request gets its result, and every
hostile record gets exactly one dead letter that explains itself and fits
under Kafka's default topic limit (1 MiB), whatever the input's size.

kcat comes from Debian's package, installed with apt-get when missing (the
way scripts/stack installs redis-server; CI runs as root on a fresh machine).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import operator
import os
import resource
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from service.kafka.io import KafkaIO
from service.messages import DeadLetter, DeadLetterReason
from tests.fixtures.bridge import Rig, assert_exactly_once, pdf_request
from tests.fixtures.stack import wait_for

MiB = 1024 * 1024
#: Kafka's default topic limit: every dead letter must fit under it.
KAFKA_DEFAULT_MAX_MESSAGE_BYTES = 1_048_588
#: One argv string may hold at most 128 KiB (Linux MAX_ARG_STRLEN): kcat's -H takes a header
#: from the command line, so 4 MiB of headers go as 33 headers just under that.
HEADER_CHUNK = 127 * 1024


def ensure_kcat() -> str:
    """kcat from Debian's packages, installed with apt-get when missing (needs root)."""
    if shutil.which("kcat") is None:
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            pytest.fail(
                "kcat is missing and this is not root with apt-get: apt-get install -y kcat"
            )
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        install = ["apt-get", "install", "-y", "kcat"]
        for attempt in ([install], [["apt-get", "update"], install]):  # update only if needed
            results = [
                subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
                for cmd in attempt
            ]
            if results[-1].returncode == 0:
                break
        else:
            lines = (results[-1].stdout + results[-1].stderr).strip().splitlines()
            pytest.fail(f"apt-get could not install kcat: {lines[-1] if lines else 'no output'}")
    found = shutil.which("kcat")
    assert found, "apt-get installed kcat but there is no kcat on PATH"
    return found


@pytest.fixture(scope="session")
def kcat() -> str:
    return ensure_kcat()


@contextlib.contextmanager
def big_argv() -> Iterator[None]:
    """Megabytes of command line for the processes started meanwhile: ARG_MAX is a quarter of
    the stack limit, which a child inherits (set here, not in preexec_fn: the test process has
    threads)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_STACK)
    want = 256 * MiB if hard == resource.RLIM_INFINITY else min(256 * MiB, hard)
    resource.setrlimit(resource.RLIMIT_STACK, (max(soft, want), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_STACK, (soft, hard))


class Kcat:
    """`kcat -P` to partition 0 of the rig's input topic."""

    def __init__(self, binary: str, rig: Rig, workdir: Path) -> None:
        self.binary = binary
        self.rig = rig
        self.workdir = workdir

    def _run(self, args: list[bytes | str], *, stdin: bytes | None = None) -> None:
        cmd: list[bytes | str] = [
            self.binary,
            "-P",
            "-b",
            self.rig.bootstrap,
            "-t",
            self.rig.input_topic,
            "-p",
            "0",
            "-X",
            "message.max.bytes=33554432",
            *args,
        ]
        with big_argv():
            result = subprocess.run(cmd, input=stdin, capture_output=True, timeout=60, check=False)
        assert result.returncode == 0, result.stderr.decode(errors="replace")[-2000:]

    def file(
        self, value: bytes, *, key: str | None = None, headers: list[bytes] | None = None
    ) -> None:
        """The whole of `value` as one record (kcat's FILE argument)."""
        path = self.workdir / f"value-{uuid.uuid4().hex[:8]}.bin"
        path.write_bytes(value)
        args: list[bytes | str] = []
        if key is not None:
            args += ["-k", key]
        for header in headers or []:
            args += [b"-H", header]
        self._run([*args, str(path)])

    def lines(self, records: list[tuple[bytes, bytes]]) -> None:
        """Records as `key<TAB>value` lines on stdin (keys of any size)."""
        body = b"".join(key + b"\t" + value + b"\n" for key, value in records)
        self._run(["-K", "\t"], stdin=body)

    def good(self, ids: list[str]) -> None:
        self.lines([(rid.encode(), json.dumps(pdf_request(rid)).encode()) for rid in ids])


def dead_letter_records(rig: Rig) -> list[tuple[bytes | None, bytes, list[tuple[str, Any]]]]:
    """Every committed dead-letter record: (key, value, headers), as Kafka holds them."""
    consumer = Consumer(
        {
            "bootstrap.servers": rig.bootstrap,
            "group.id": f"kcat-test-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            "enable.partition.eof": True,
        }
    )
    try:
        md = consumer.list_topics(rig.dead_letter_topic, timeout=10)
        parts = list(md.topics[rig.dead_letter_topic].partitions)
        consumer.assign([TopicPartition(rig.dead_letter_topic, p, 0) for p in parts])
        records: list[tuple[bytes | None, bytes, list[tuple[str, Any]]]] = []
        at_end: set[int] = set()
        while len(at_end) < len(parts):
            for msg in consumer.consume(500, timeout=1.0):
                if msg.error() is not None:
                    at_end.add(msg.partition() or 0)
                    continue
                records.append((msg.key(), msg.value() or b"", list(msg.headers() or [])))
        return records
    finally:
        consumer.close()


def sha256(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


@pytest.fixture
def hostile_rig(rig_factory: Any, kcat: str, tmp_path: Path) -> tuple[Rig, Kcat]:
    rig: Rig = rig_factory()
    # As many clusters have it: the dead-letter topic created by someone else, at Kafka's
    # default record limit (the bridge would create it with 2 MiB).
    admin = AdminClient({"bootstrap.servers": rig.bootstrap})
    topic = NewTopic(
        rig.dead_letter_topic,
        num_partitions=3,
        replication_factor=1,
        config={"max.message.bytes": str(KAFKA_DEFAULT_MAX_MESSAGE_BYTES)},
    )
    admin.create_topics([topic])[rig.dead_letter_topic].result(30)
    return rig, Kcat(kcat, rig, tmp_path)


def test_hostile_records_from_kcat_become_dead_letters_and_good_requests_flow(
    hostile_rig: tuple[Rig, Kcat],
) -> None:
    rig, kc = hostile_rig
    # Two replicas: a record that killed one would kill the next owner of partition 0 too.
    bridges = [rig.bridge("b1"), rig.bridge("b2")]
    for bridge in bridges:
        bridge.wait_ready()  # the bridge created the input topic, with room for big records
    good: list[str] = []

    def good_batch(tag: str, count: int = 3) -> None:
        ids = [f"good-{tag}-{i}" for i in range(count)]
        good.extend(ids)
        kc.good(ids)

    good_batch("a", 100)  # the replica's hot code is warm (CPython specialises it) by then
    # 1. Header keys that are not UTF-8 (two of them, around a good header) on a valid request.
    kc.file(
        json.dumps(pdf_request("hostile-key")).encode(),
        key="hostile-key",
        headers=[b"trace=t-1", b"\xff\xfe=v1", b"ok=2", b"bad\xc3=v2"],
    )
    good_batch("b")
    # 2. 6 MiB of control bytes as the value (JSON-escaped: about 38 MB).
    control = bytes(range(32)) * (6 * MiB // 32)
    kc.file(control, key="hostile-control")
    good_batch("c")
    # 3. 4 MiB of headers (control bytes, 33 headers: kcat takes headers from argv) on a valid
    # request, and one 4 MiB header from a Python producer.
    chunk = b"\x01" * HEADER_CHUNK
    kc.file(
        json.dumps(pdf_request("hostile-headers")).encode(),
        key="hostile-headers",
        headers=[b"h%d=" % i + chunk for i in range(33)],
    )
    producer = Producer({"bootstrap.servers": rig.bootstrap, "message.max.bytes": 33554432})
    producer.produce(
        rig.input_topic,
        key=b"hostile-header",
        value=json.dumps(pdf_request("hostile-header")).encode(),
        headers=[("big", b"\x02" * (4 * MiB))],
        partition=0,
    )
    assert producer.flush(30) == 0
    good_batch("d")
    # 4. A 1 MB key: on a valid request, and on a value that is not JSON at all.
    big_key = b"k" * 1_000_000
    kc.lines([(big_key, json.dumps(pdf_request("hostile-bigkey")).encode())])
    kc.lines([(big_key, b"not json, and no request id")])
    good_batch("e")

    hostile = {"hostile-key", "hostile-control", "hostile-headers", "hostile-header"}
    hostile |= {"hostile-bigkey"}
    grouped = rig.wait_outcomes(set(good) | hostile, timeout_s=120)
    # The record without a request id has no id to wait for: wait for its dead letter.
    wait_for(lambda: None in rig.by_request(), 30, message="the dead letter of the id-less record")
    grouped = rig.by_request()

    assert all(b.alive for b in bridges), "a bridge process exited"
    for bridge in bridges:
        log = bridge.log_path.read_text(errors="replace")
        assert "kafka_thread_failed" not in log
        assert "Traceback" not in log
    assert_exactly_once(grouped, set(good) | hostile)
    for rid in good:
        assert grouped[rid][0].result is not None, f"{rid}: {grouped[rid][0].dead_letter}"
    assert len(grouped[None]) == 1, "the id-less hostile record: exactly one dead letter"

    letters: dict[str | None, DeadLetter] = {}
    for rid in [*hostile, None]:
        letter = grouped[rid][0].dead_letter
        assert letter is not None, f"{rid} got a result"
        letters[rid] = letter

    # 1. Header keys: malformed_record naming the key's bytes; the first bad key's bytes are
    # recovered, the second is lost (confluent-kafka cannot give it back), the rest intact.
    bad_keys = letters["hostile-key"]
    assert bad_keys.reason is DeadLetterReason.MALFORMED_RECORD
    assert "header key is not UTF-8 (header 2 of 4: bytes ff fe" in bad_keys.message
    headers = bad_keys.original.headers
    assert [h.key for h in headers][0::2] == ["trace", "ok"]
    assert headers[1].key_bytes is not None
    assert headers[1].key_bytes.raw() == b"\xff\xfe"
    assert headers[3].key_lost
    assert [h.value.raw() if h.value else None for h in headers] == [b"t-1", b"v1", b"2", b"v2"]
    assert bad_keys.original.value is not None
    assert json.loads(bad_keys.original.value.raw())["request_id"] == "hostile-key"

    # 2. 6 MiB of control bytes: a prefix, its whole size and SHA-256.
    control_letter = letters["hostile-control"]
    assert control_letter.reason is DeadLetterReason.MALFORMED_RECORD
    orig = control_letter.original
    assert orig.value_truncated
    assert orig.value_size == len(control)
    assert orig.value_sha256 == sha256(control)
    assert orig.value is not None
    assert control.startswith(orig.value.raw())

    # 3. Headers over BRIDGE_MAX_HEADER_BYTES: too_large, naming the cap.
    for rid in ("hostile-headers", "hostile-header"):
        letter = letters[rid]
        assert letter.reason is DeadLetterReason.TOO_LARGE, letter.message
        assert "BRIDGE_MAX_HEADER_BYTES=65536" in letter.message
        assert letter.original.headers_truncated
    assert letters["hostile-headers"].original.headers_count == 33
    assert letters["hostile-header"].original.headers_size == 3 + 4 * MiB

    # 4. A 1 MB key: too_large on the valid request; the id-less one keeps its reason.
    for letter in (letters["hostile-bigkey"], letters[None]):
        # Whole while the dead letter fits its topic (1 MB here), else a described prefix.
        key = letter.original.key
        assert key is not None
        if letter.original.key_truncated:
            assert letter.original.key_size == len(big_key)
            assert letter.original.key_sha256 == sha256(big_key)
            assert big_key.startswith(key.raw())
        else:
            assert key.raw() == big_key
    assert letters["hostile-bigkey"].reason is DeadLetterReason.TOO_LARGE
    assert "record key is 1000000 bytes" in letters["hostile-bigkey"].message
    assert letters[None].reason is DeadLetterReason.MALFORMED_RECORD
    assert "also: record key is 1000000 bytes" in letters[None].message

    # Every dead letter fits Kafka's default topic limit; none is keyed by the 1 MB key.
    records = dead_letter_records(rig)
    assert len(records) == len(hostile) + 1
    for key, value, kafka_headers in records:
        size = len(key or b"") + len(value)
        size += sum(len(k.encode()) + len(v or b"") for k, v in kafka_headers)
        assert size < KAFKA_DEFAULT_MAX_MESSAGE_BYTES
        letter = DeadLetter.model_validate_json(value)
        expected_key = letter.request_id.encode() if letter.request_id else None
        assert key == expected_key


def test_header_keys_confluent_kafka_cannot_decode_are_recovered(
    kcat: str, make_topic: Any, kafka_bootstrap: str
) -> None:
    """What confluent-kafka 2.16 does with a header key that is not UTF-8, and what the bridge
    gets back (KafkaIO._read_headers): every value, every good key, the first bad key's bytes;
    the later bad keys' bytes are lost inside the library. 300 good records go first: CPython
    specialises hot call sites, after which a plain ``msg.headers()`` no longer raises."""
    topic = make_topic("kcat-headers", partitions=1)
    base: list[bytes | str] = [kcat, "-P", "-b", kafka_bootstrap, "-t", topic, "-p", "0"]
    good = b"".join(b"good-%d\n" % i for i in range(300))
    result = subprocess.run(
        [*base, "-H", "a=1"], input=good, capture_output=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    bad: list[bytes | str] = [*base]
    for header in [b"a=1", b"\xff\xfe=2", b"b=3", b"bad\xc3=4", b"\x80=5", b"none"]:
        bad += [b"-H", header]
    for _ in range(2):
        result = subprocess.run(bad, input=b"bad\n", capture_output=True, timeout=60, check=False)
        assert result.returncode == 0, result.stderr
    consumer = Consumer(
        {
            "bootstrap.servers": kafka_bootstrap,
            "group.id": f"kcat-headers-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    msgs: list[Any] = []

    def consumed_all() -> bool:
        msgs.extend(m for m in consumer.consume(500, 1.0) if m.error() is None)
        return len(msgs) >= 302

    try:
        consumer.assign([TopicPartition(topic, 0, 0)])
        wait_for(consumed_all, 30, message="every record consumed")
    finally:
        consumer.close()
    for msg in msgs[:300]:
        assert KafkaIO._read_headers(msg) == [("a", b"1")]
    recovered = [
        ("a", b"1"),
        (b"\xff\xfe", b"2"),
        ("b", b"3"),
        (None, b"4"),
        (None, b"5"),
        ("none", None),
    ]
    assert KafkaIO._read_headers(msgs[300]) == recovered
    # The library: the first checked call raises SystemError, caused by the first bad key's
    # UnicodeDecodeError; the list it leaves behind has empty key slots.
    with pytest.raises(SystemError) as raised:
        operator.methodcaller("headers")(msgs[301])
    assert "returned a result with an exception set" in str(raised.value)
    # Read after that, no error says which key was which: every bad key is lost, nothing crashes.
    assert KafkaIO._read_headers(msgs[301]) == [
        (k if isinstance(k, str) else None, v) for k, v in recovered
    ]
