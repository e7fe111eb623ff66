"""The local stack is real: transactions, fencing, compaction and SASL on the Kafka broker, Lua and
ACLs on Redis, and scripts/stack itself (idempotent up, restart keeping data, down leaving no
process behind)."""

from __future__ import annotations

import base64
import hashlib
import importlib.machinery
import importlib.util
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import redis
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic, ResourceType

from tests.fixtures.stack import (
    STACK_SCRIPT,
    consume_all,
    parse_env_file,
    stack_ctl,
    wait_for,
)

MAKE_TOPIC = Callable[..., str]
UNIQUE_ID = Callable[..., str]


# --------------------------------------------------------------------------- Kafka


def _produce(bootstrap: str, topic: str, values: list[bytes]) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    for i, value in enumerate(values):
        producer.produce(topic, value=value, key=f"k{i}".encode())
    assert producer.flush(30) == 0


def _create_topic(bootstrap: str, name: str) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    topic = NewTopic(name, num_partitions=1, replication_factor=1)
    admin.create_topics([topic])[name].result(timeout=30)


def _consume_n(consumer: Consumer, count: int, timeout_s: float = 30.0) -> list[Any]:
    got: list[Any] = []

    def enough() -> bool:
        msg = consumer.poll(0.2)
        if msg is not None:
            if msg.error() is not None:
                raise KafkaException(msg.error())
            got.append(msg)
        return len(got) >= count

    wait_for(enough, timeout_s, interval_s=0, message=f"{count} records from the group consumer")
    return got


def _committed_total(consumer: Consumer, topic: str, partitions: int) -> int:
    committed = consumer.committed([TopicPartition(topic, p) for p in range(partitions)], 10)
    return sum(max(tp.offset, 0) for tp in committed)


def test_transaction_commits_records_with_offsets_and_abort_stays_invisible(
    kafka_bootstrap: str, make_topic: MAKE_TOPIC, unique_id: UNIQUE_ID
) -> None:
    source = make_topic("tx-in")
    sink = make_topic("tx-out")
    consumer = Consumer(
        {
            "bootstrap.servers": kafka_bootstrap,
            "group.id": unique_id("tx-group"),
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
        }
    )
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "transactional.id": unique_id("tx")})
    try:
        consumer.subscribe([source])
        producer.init_transactions(30)

        # Committed: 6 records consumed, 6 written, offsets moved with them.
        _produce(kafka_bootstrap, source, [f"in-{i}".encode() for i in range(6)])
        inputs = _consume_n(consumer, 6)
        producer.begin_transaction()
        for msg in inputs:
            producer.produce(sink, key=msg.key(), value=b"out-" + msg.value())
        producer.send_offsets_to_transaction(
            consumer.position(consumer.assignment()), consumer.consumer_group_metadata(), 30
        )
        producer.commit_transaction(30)

        committed_values = sorted(r.value or b"" for r in consume_all(kafka_bootstrap, sink))
        assert committed_values == sorted(f"out-in-{i}".encode() for i in range(6))
        assert _committed_total(consumer, source, 3) == 6

        # Aborted: 3 more consumed and written, then abort: neither records nor offsets count.
        _produce(kafka_bootstrap, source, [f"late-{i}".encode() for i in range(3)])
        late = _consume_n(consumer, 3)
        producer.begin_transaction()
        for msg in late:
            producer.produce(sink, key=msg.key(), value=b"aborted-" + msg.value())
        producer.send_offsets_to_transaction(
            consumer.position(consumer.assignment()), consumer.consumer_group_metadata(), 30
        )
        # Flush first: abort purges records still queued, and this test wants them written.
        assert producer.flush(30) == 0
        producer.abort_transaction(30)

        visible = [r.value or b"" for r in consume_all(kafka_bootstrap, sink)]
        assert sorted(visible) == committed_values
        written = consume_all(kafka_bootstrap, sink, isolation="read_uncommitted")
        assert sum(1 for r in written if (r.value or b"").startswith(b"aborted-")) == 3
        assert _committed_total(consumer, source, 3) == 6
    finally:
        consumer.close()


def test_newer_transactional_producer_fences_the_older(
    kafka_bootstrap: str, make_topic: MAKE_TOPIC, unique_id: UNIQUE_ID
) -> None:
    topic = make_topic("fence")
    transactional_id = unique_id("fence-tx")
    quiet = {"log_level": 0}  # the fenced instance logs its fatal error; expected here
    zombie = Producer(
        {"bootstrap.servers": kafka_bootstrap, "transactional.id": transactional_id, **quiet}
    )
    zombie.init_transactions(30)
    zombie.begin_transaction()
    zombie.produce(topic, value=b"zombie")
    zombie.flush(10)

    successor = Producer(
        {"bootstrap.servers": kafka_bootstrap, "transactional.id": transactional_id}
    )
    successor.init_transactions(30)

    with pytest.raises(KafkaException) as excinfo:
        zombie.commit_transaction(30)
    error = excinfo.value.args[0]
    assert error.fatal()
    assert error.code() in (KafkaError._FENCED, KafkaError.PRODUCER_FENCED)

    successor.begin_transaction()
    successor.produce(topic, value=b"successor")
    successor.commit_transaction(30)
    assert [r.value for r in consume_all(kafka_bootstrap, topic)] == [b"successor"]


def _topic_config(admin: AdminClient, topic: str) -> dict[str, str]:
    resource = ConfigResource(ResourceType.TOPIC, topic)
    entries = admin.describe_configs([resource])[resource].result(timeout=30)
    return {name: entry.value for name, entry in entries.items()}


def test_compacted_topic_is_created_through_admin_client(
    kafka_admin: AdminClient, make_topic: MAKE_TOPIC
) -> None:
    compacted = make_topic("pending", config={"cleanup.policy": "compact"})
    plain = make_topic("plain")
    assert _topic_config(kafka_admin, compacted)["cleanup.policy"] == "compact"
    assert _topic_config(kafka_admin, plain)["cleanup.policy"] == "delete"


KAFKA_DEFAULT_MAX_MESSAGE_BYTES = "1048588"  # Kafka's own default for message.max.bytes


def test_broker_keeps_kafka_default_limits_and_a_topic_can_raise_its_own(
    kafka_bootstrap: str, kafka_admin: AdminClient, make_topic: MAKE_TOPIC
) -> None:
    """Like a user's cluster: 1 MB by default, more only where the topic's creator asks."""
    plain = make_topic("small", partitions=1)
    assert _topic_config(kafka_admin, plain)["max.message.bytes"] == KAFKA_DEFAULT_MAX_MESSAGE_BYTES
    big_topic = make_topic("big", partitions=1, config={"max.message.bytes": "20971520"})
    assert _topic_config(kafka_admin, big_topic)["max.message.bytes"] == "20971520"

    big = os.urandom(15 * 1024 * 1024)
    results: dict[str, KafkaError | None] = {}
    producer = Producer(
        {
            "bootstrap.servers": kafka_bootstrap,
            "message.max.bytes": 30 * 1024 * 1024,  # client side: let the broker decide
            "compression.type": "none",
        }
    )

    def report(name: str) -> Callable[[KafkaError | None, Any], None]:
        return lambda err, _msg: results.__setitem__(name, err)

    producer.produce(plain, value=os.urandom(2 * 1024 * 1024), on_delivery=report("2mb-plain"))
    producer.produce(big_topic, value=big, on_delivery=report("15mb-big"))
    producer.produce(big_topic, value=os.urandom(21 * 1024 * 1024), on_delivery=report("21mb-big"))
    assert producer.flush(60) == 0
    assert results["15mb-big"] is None
    for name in ("2mb-plain", "21mb-big"):
        error = results[name]
        assert error is not None, name
        assert error.code() == KafkaError.MSG_SIZE_TOO_LARGE, name
    [record] = consume_all(kafka_bootstrap, big_topic)
    assert record.value == big
    assert consume_all(kafka_bootstrap, plain) == []


def test_sasl_scram_listener_accepts_the_stack_user_and_rejects_a_bad_password(
    stack_env: dict[str, str], make_topic: MAKE_TOPIC
) -> None:
    if "STACK_KAFKA_SASL_BOOTSTRAP" not in stack_env:
        pytest.skip("Kafka is external (KAFKA_BOOTSTRAP_SERVERS) and has no stack SASL listener")
    topic = make_topic("sasl")
    sasl: dict[str, str | int | float | bool] = {
        "bootstrap.servers": stack_env["STACK_KAFKA_SASL_BOOTSTRAP"],
        "security.protocol": "SASL_PLAINTEXT",
        "sasl.mechanism": stack_env["STACK_KAFKA_SASL_MECHANISM"],
        "sasl.username": stack_env["STACK_KAFKA_SASL_USERNAME"],
        "sasl.password": stack_env["STACK_KAFKA_SASL_PASSWORD"],
    }
    assert topic in AdminClient(sasl).list_topics(timeout=10).topics

    errors: list[KafkaError] = []
    bad = Producer(
        {**sasl, "sasl.password": "wrong-password", "log_level": 0, "error_cb": errors.append}
    )

    def authentication_failed() -> bool:
        bad.poll(0.1)
        return any(e.code() == KafkaError._AUTHENTICATION for e in errors)

    wait_for(authentication_failed, 15.0, message="SASL authentication error for a bad password")


def _sasl_ssl_config(stack_env: dict[str, str]) -> dict[str, str | int | float | bool]:
    if "STACK_KAFKA_SASL_BOOTSTRAP" not in stack_env:
        pytest.skip("Kafka is external (KAFKA_BOOTSTRAP_SERVERS) and has no stack SASL listener")
    assert "STACK_KAFKA_SSL_BOOTSTRAP" in stack_env, (
        "the stack has no SASL_SSL listener: it was started by an older scripts/stack; "
        "`scripts/stack restart kafka` adds it"
    )
    return {
        "bootstrap.servers": stack_env["STACK_KAFKA_SSL_BOOTSTRAP"],
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": stack_env["STACK_KAFKA_SASL_MECHANISM"],
        "sasl.username": stack_env["STACK_KAFKA_SASL_USERNAME"],
        "sasl.password": stack_env["STACK_KAFKA_SASL_PASSWORD"],
        "ssl.ca.location": stack_env["STACK_KAFKA_CA_LOCATION"],
    }


def _fails_with(
    conf: dict[str, str | int | float | bool], codes: set[int], what: str, text: str = ""
) -> None:
    errors: list[KafkaError] = []
    client = Producer({**conf, "log_level": 0, "error_cb": errors.append})

    def failed() -> bool:
        client.poll(0.1)
        return any(e.code() in codes and text in e.str() for e in errors)

    wait_for(failed, 15.0, message=what)


def test_sasl_ssl_listener_verifies_with_the_stack_ca_file_or_pem_text(
    stack_env: dict[str, str], make_topic: MAKE_TOPIC, unique_id: UNIQUE_ID
) -> None:
    tls = _sasl_ssl_config(stack_env)
    ca_file = Path(str(tls["ssl.ca.location"]))
    assert ca_file.read_text().startswith("-----BEGIN CERTIFICATE-----")
    topic = make_topic("tls", partitions=1)

    # CA as a file: a transactional producer and a read_committed reader, all over TLS.
    producer = Producer({**tls, "transactional.id": unique_id("tls-tx")})
    producer.init_transactions(30)
    producer.begin_transaction()
    producer.produce(topic, key=b"k", value=b"over-tls")
    producer.commit_transaction(30)
    records = consume_all(str(tls["bootstrap.servers"]), topic, config=tls)
    assert [r.value for r in records] == [b"over-tls"]

    # CA as PEM text (what a Secret gives as an environment variable): no file at all.
    pem = {k: v for k, v in tls.items() if k != "ssl.ca.location"}
    pem["ssl.ca.pem"] = ca_file.read_text()
    metadata = AdminClient(pem).list_topics(timeout=10)
    assert topic in metadata.topics
    ssl_ports = {b.split(":")[1] for b in str(tls["bootstrap.servers"]).split(",")}
    assert {str(b.port) for b in metadata.brokers.values()} == ssl_ports  # advertised: SSL

    # Another CA (the system's bundle) does not vouch for the stack's broker.
    _fails_with(
        {**tls, "ssl.ca.location": "/etc/ssl/certs/ca-certificates.crt"},
        {KafkaError._SSL},
        "TLS handshake failure with a CA that did not sign the broker's certificate",
        text="certificate verify failed",
    )
    # Plaintext bytes to the TLS port are not a Kafka connection either.
    plain = {k: v for k, v in pem.items() if not k.startswith("ssl.")}
    _fails_with(
        {**plain, "security.protocol": "SASL_PLAINTEXT"},
        {KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN},
        "a SASL_PLAINTEXT client refused by the SASL_SSL listener",
    )
    _fails_with(
        {**tls, "sasl.password": "wrong-password"},
        {KafkaError._AUTHENTICATION},
        "SASL authentication error over TLS for a bad password",
    )


# --------------------------------------------------------------------------- Redis

INCR_BY_SCRIPT = """
-- {tag}
local value = redis.call('INCRBY', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[1], 60)
return value
"""


def test_redis_lua_script_round_trip_with_noscript_fallback(
    redis_url: str, unique_id: UNIQUE_ID
) -> None:
    client = redis.Redis.from_url(redis_url)
    key = unique_id("lua")
    # A script text no one has loaded yet (the tag makes it unique), so EVALSHA must miss.
    script = INCR_BY_SCRIPT.format(tag=unique_id("script"))
    sha = hashlib.sha1(script.encode()).hexdigest()  # Redis names scripts by SHA1
    try:
        with pytest.raises(redis.exceptions.NoScriptError):
            client.evalsha(sha, 1, key, 5)
        assert client.eval(script, 1, key, 5) == 5  # the fallback, which also caches it
        assert client.script_load(script) == sha
        assert client.script_exists(sha) == [True]
        assert client.evalsha(sha, 1, key, 2) == 7
        assert client.get(key) == b"7"
    finally:
        client.delete(key)
        client.close()


def test_redis_acl_user_needs_its_password(stack_env: dict[str, str], redis_url: str) -> None:
    if "STACK_REDIS_AUTH_URL" not in stack_env:
        pytest.skip("Redis is external (REDIS_URL) and has no stack ACL user")
    auth_url = stack_env["STACK_REDIS_AUTH_URL"]
    with redis.Redis.from_url(auth_url) as client:
        assert client.ping()
        assert client.acl_whoami() == "bridge"
    password = auth_url.split("://", 1)[1].split("@", 1)[0].split(":", 1)[1]
    with (
        redis.Redis.from_url(auth_url.replace(password, "not-the-password")) as wrong,
        pytest.raises(redis.exceptions.AuthenticationError),
    ):
        wrong.ping()
    with redis.Redis.from_url(redis_url) as anonymous:
        assert anonymous.acl_whoami() == "default"


# --------------------------------------------------------------------------- scripts/stack


def _load_stack_module() -> ModuleType:
    loader = importlib.machinery.SourceFileLoader("stack_script", str(STACK_SCRIPT))
    spec = importlib.util.spec_from_loader("stack_script", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["stack_script"] = module  # dataclasses resolve annotations through it
    loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def stack_module() -> ModuleType:
    return _load_stack_module()


def test_cluster_id_is_22_chars_of_base64url_for_16_bytes(stack_module: ModuleType) -> None:
    for _ in range(200):
        cluster_id = stack_module.new_cluster_id()
        assert len(cluster_id) == 22
        assert not cluster_id.startswith("-")
        assert len(base64.urlsafe_b64decode(cluster_id + "==")) == 16


def _properties(stack_module: ModuleType, tmp_path: Path, **kwargs: Any) -> dict[str, str]:
    text = stack_module.render_server_properties(
        port=1,
        controller_port=2,
        sasl_port=3,
        ssl_port=4,
        data_dir=tmp_path,
        keystore=tmp_path / "broker.p12",
        keystore_password="secret",
        **kwargs,
    )
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


INTERNAL_TOPIC_SETTINGS = (
    "offsets.topic.replication.factor",
    "transaction.state.log.replication.factor",
    "transaction.state.log.min.isr",
    "share.coordinator.state.topic.replication.factor",
    "share.coordinator.state.topic.min.isr",
)


def test_server_properties_make_transactions_work_on_one_node(
    stack_module: ModuleType, tmp_path: Path
) -> None:
    settings = _properties(stack_module, tmp_path)
    for key in INTERNAL_TOPIC_SETTINGS:
        assert settings[key] == "1", key
    assert settings["auto.create.topics.enable"] == "false"
    assert settings["group.initial.rebalance.delay.ms"] == "0"
    assert not [key for key in settings if "max.bytes" in key]  # Kafka's default limits
    assert settings["controller.quorum.bootstrap.servers"] == "127.0.0.1:2"
    assert "SASL_PLAINTEXT://127.0.0.1:3" in settings["listeners"]
    assert "SASL_SSL://127.0.0.1:4" in settings["advertised.listeners"]
    assert settings["listener.name.sasl_ssl.ssl.keystore.location"] == str(tmp_path / "broker.p12")
    assert settings["listener.name.sasl_ssl.sasl.enabled.mechanisms"] == "SCRAM-SHA-512"


def test_server_properties_of_a_cluster_node_replicate_three_ways(
    stack_module: ModuleType, tmp_path: Path
) -> None:
    voters = "1@127.0.0.1:2,2@127.0.0.1:12,3@127.0.0.1:22"
    settings = _properties(stack_module, tmp_path, node_id=2, voters=voters)
    assert settings["node.id"] == "2"
    assert settings["controller.quorum.voters"] == voters
    assert "controller.quorum.bootstrap.servers" not in settings
    replication = [k for k in INTERNAL_TOPIC_SETTINGS if k.endswith("replication.factor")]
    for key in [*replication, "default.replication.factor"]:
        assert settings[key] == "3", key
    for key in [k for k in INTERNAL_TOPIC_SETTINGS if k.endswith("min.isr")]:
        assert settings[key] == "2", key
    assert settings["min.insync.replicas"] == "2"
    assert not [key for key in settings if "max.bytes" in key]


def test_cluster_ports_are_one_per_node_or_stepped_from_one(
    stack_module: ModuleType, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("STACK_KAFKA_PORT", "30000")
    assert stack_module.env_ports("STACK_KAFKA_PORT", 3) == [30000, 30010, 30020]
    monkeypatch.setenv("STACK_KAFKA_PORT", "30000,31000,32000")
    assert stack_module.env_ports("STACK_KAFKA_PORT", 3) == [30000, 31000, 32000]
    with pytest.raises(stack_module.StackError, match="one port per node"):
        stack_module.env_ports("STACK_KAFKA_PORT", 2)
    for name in ("STACK_KAFKA_PORT", "STACK_KAFKA_CONTROLLER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name in ("STACK_KAFKA_SASL_PORT", "STACK_KAFKA_SSL_PORT"):
        monkeypatch.delenv(name, raising=False)
    plan = stack_module.KafkaCluster(tmp_path, 3).plan()
    assert [node["port"] for node in plan] == [19092, 19102, 19112]
    assert [node["ssl_port"] for node in plan] == [19095, 19105, 19115]
    assert len({node["cluster_id"] for node in plan}) == 1

    # A stack set up with one broker is not silently turned into a cluster.
    (tmp_path / "kafka").mkdir()
    (tmp_path / "kafka" / "stack.json").write_text("{}")
    with pytest.raises(stack_module.StackError, match=r"set up with 1 broker.*--fresh"):
        stack_module.kafka_cluster(tmp_path, 3)


def test_a_stack_on_other_ports_gets_a_free_ssl_port_not_the_default(
    stack_module: ModuleType, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("STACK_KAFKA_SSL_PORT", raising=False)
    for name, port in (
        ("STACK_KAFKA_PORT", "30001"),
        ("STACK_KAFKA_CONTROLLER_PORT", "30002"),
        ("STACK_KAFKA_SASL_PORT", "30003"),
    ):
        monkeypatch.setenv(name, port)
    [node] = stack_module.KafkaCluster(tmp_path, 1).plan()
    assert node["ssl_port"] not in (19095, 30001, 30002, 30003)


def test_a_port_override_conflicting_with_the_set_up_stack_is_refused(
    stack_module: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STACK_REDIS_PORT", "20000")
    assert stack_module.choose_port("STACK_REDIS_PORT", None) == 20000
    assert stack_module.choose_port("STACK_REDIS_PORT", 20000) == 20000
    with pytest.raises(stack_module.StackError, match="set up with 16379"):
        stack_module.choose_port("STACK_REDIS_PORT", 16379)


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@pytest.fixture
def isolated_stack(tmp_path: Path) -> Iterator[dict[str, str]]:
    """Environment for a second, independent stack in tmp_path on free ports; torn down after."""
    kafka, controller, sasl, ssl, redis_port = _free_ports(5)
    env = {
        **os.environ,
        "STACK_DIR": str(tmp_path / "stack"),
        "STACK_KAFKA_PORT": str(kafka),
        "STACK_KAFKA_CONTROLLER_PORT": str(controller),
        "STACK_KAFKA_SASL_PORT": str(sasl),
        "STACK_KAFKA_SSL_PORT": str(ssl),
        "STACK_REDIS_PORT": str(redis_port),
    }
    yield env
    stack_ctl("down", "--wipe", env=env, check=False)


def _status(env: dict[str, str]) -> tuple[int, dict[str, Any]]:
    result = stack_ctl("status", "--json", env=env, check=False)
    return result.returncode, json.loads(result.stdout)


def _process_gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")  # zombie: dead, awaiting reaping


def test_isolated_stack_up_is_idempotent_restart_keeps_data_and_down_leaves_nothing(
    isolated_stack: dict[str, str],
) -> None:
    env = isolated_stack
    started = time.monotonic()
    stack_ctl("up", env=env)
    cold_up_s = time.monotonic() - started

    code, status = _status(env)
    assert code == 0
    pids = {name: status[name]["pid"] for name in ("kafka", "redis")}
    assert status["kafka"]["address"] == f"127.0.0.1:{env['STACK_KAFKA_PORT']}"
    text = stack_ctl("status", env=env).stdout
    assert f"kafka  running  pid {pids['kafka']}  127.0.0.1:{env['STACK_KAFKA_PORT']}" in text
    assert f"redis  running  pid {pids['redis']}  127.0.0.1:{env['STACK_REDIS_PORT']}" in text

    started = time.monotonic()
    again = stack_ctl("up", env=env)
    warm_up_s = time.monotonic() - started
    assert "already running" in again.stderr
    assert {name: _status(env)[1][name]["pid"] for name in pids} == pids
    print(f"isolated stack: cold up {cold_up_s:.1f} s, warm up {warm_up_s:.2f} s")

    settings = parse_env_file(Path(env["STACK_DIR"]) / "env")
    assert settings["KAFKA_BOOTSTRAP_SERVERS"] == f"127.0.0.1:{env['STACK_KAFKA_PORT']}"
    assert settings["STACK_KAFKA_SSL_BOOTSTRAP"] == f"127.0.0.1:{env['STACK_KAFKA_SSL_PORT']}"
    assert settings["STACK_KAFKA_CA_LOCATION"] == f"{env['STACK_DIR']}/tls/ca.pem"
    assert settings["STACK_KAFKA_BROKERS"] == "1"
    assert settings["REDIS_URL"] == f"redis://127.0.0.1:{env['STACK_REDIS_PORT']}/0"
    assert oct(os.stat(Path(env["STACK_DIR"]) / "env").st_mode & 0o777) == "0o600"

    # Restarting Redis: a new process with the same ACL user.
    stack_ctl("restart", "redis", env=env)
    new_redis_pid = _status(env)[1]["redis"]["pid"]
    assert new_redis_pid != pids["redis"]
    assert _process_gone(pids["redis"])
    with redis.Redis.from_url(settings["STACK_REDIS_AUTH_URL"]) as client:
        assert client.acl_whoami() == "bridge"

    # Restarting Kafka keeps topics and records.
    bootstrap = settings["KAFKA_BOOTSTRAP_SERVERS"]
    _create_topic(bootstrap, "kept")
    _produce(bootstrap, "kept", [b"before-restart"])
    stack_ctl("restart", "kafka", env=env)
    new_kafka_pid = _status(env)[1]["kafka"]["pid"]
    assert new_kafka_pid != pids["kafka"]
    assert [r.value for r in consume_all(bootstrap, "kept")] == [b"before-restart"]

    stack_ctl("down", env=env)
    code, status = _status(env)
    assert code == 3
    assert not status["kafka"]["running"]
    assert not status["redis"]["running"]
    for pid in (*pids.values(), new_redis_pid, new_kafka_pid):
        assert _process_gone(pid), pid
    for port in ("STACK_KAFKA_PORT", "STACK_REDIS_PORT"):
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", int(env[port])), 1).close()


@pytest.fixture
def isolated_cluster(tmp_path: Path) -> Iterator[dict[str, str]]:
    """Environment for a three-broker stack in tmp_path on free ports; torn down after."""
    ports = _free_ports(13)
    env = {
        **os.environ,
        "STACK_DIR": str(tmp_path / "cluster"),
        "STACK_KAFKA_START_TIMEOUT_S": "300",
    }
    names = ("PORT", "CONTROLLER_PORT", "SASL_PORT", "SSL_PORT")
    for i, name in enumerate(names):
        env[f"STACK_KAFKA_{name}"] = ",".join(str(p) for p in ports[3 * i : 3 * i + 3])
    env["STACK_REDIS_PORT"] = str(ports[12])
    yield env
    stack_ctl("down", "--wipe", env=env, check=False)


def _broker_ids(bootstrap: str) -> set[int]:
    return set(AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=10).brokers)


@pytest.mark.timeout(900)
def test_three_broker_cluster_survives_one_node_down_and_takes_it_back(
    isolated_cluster: dict[str, str], unique_id: UNIQUE_ID
) -> None:
    env = isolated_cluster
    started = time.monotonic()
    stack_ctl("up", "--brokers", "3", env=env, timeout_s=330)
    print(f"three-broker cluster: cold up {time.monotonic() - started:.1f} s")

    code, status = _status(env)
    assert code == 0
    assert sorted(status) == ["kafka-1", "kafka-2", "kafka-3", "redis"]
    assert [status[f"kafka-{n}"]["extra"]["node"] for n in (1, 2, 3)] == ["1", "2", "3"]
    settings = parse_env_file(Path(env["STACK_DIR"]) / "env")
    plain_ports = env["STACK_KAFKA_PORT"].split(",")
    bootstrap = settings["KAFKA_BOOTSTRAP_SERVERS"]
    assert bootstrap == ",".join(f"127.0.0.1:{p}" for p in plain_ports)
    assert len(settings["STACK_KAFKA_SSL_BOOTSTRAP"].split(",")) == 3
    assert settings["STACK_KAFKA_BROKERS"] == "3"
    assert _broker_ids(bootstrap) == {1, 2, 3}

    admin = AdminClient({"bootstrap.servers": bootstrap})
    broker = ConfigResource(ResourceType.BROKER, "1")
    config = {k: v.value for k, v in admin.describe_configs([broker])[broker].result(30).items()}
    assert config["offsets.topic.replication.factor"] == "3"
    assert config["transaction.state.log.replication.factor"] == "3"
    assert config["transaction.state.log.min.isr"] == "2"
    assert config["min.insync.replicas"] == "2"

    topic = "replicated"
    admin.create_topics([NewTopic(topic, num_partitions=3, replication_factor=3)])[topic].result(30)

    def committed_with(value: bytes) -> None:
        producer = Producer({"bootstrap.servers": bootstrap, "transactional.id": unique_id()})
        producer.init_transactions(60)
        producer.begin_transaction()
        for partition in range(3):
            producer.produce(topic, value=value, partition=partition)
        producer.commit_transaction(60)

    committed_with(b"all-up")

    # One node down (the whole of it: broker and voter): the other two carry on.
    stack_ctl("stop", "kafka-2", env=env)
    code, status = _status(env)
    assert code == 3
    assert not status["kafka-2"]["running"]
    assert status["kafka-1"]["running"]
    assert status["kafka-3"]["running"]
    wait_for(lambda: _broker_ids(bootstrap) == {1, 3}, 30.0, message="metadata without node 2")
    committed_with(b"one-down")  # min ISR 2 of 3: still writable, transactions included

    started = time.monotonic()
    stack_ctl("start", "kafka-2", env=env, timeout_s=330)
    print(f"three-broker cluster: kafka-2 back in {time.monotonic() - started:.1f} s")
    assert _status(env)[0] == 0
    assert _broker_ids(bootstrap) == {1, 2, 3}
    values = sorted(r.value or b"" for r in consume_all(bootstrap, topic))
    assert values == [b"all-up"] * 3 + [b"one-down"] * 3

    # `up` on the running cluster reuses it; asking for another size is refused in one line.
    assert "already running" in stack_ctl("up", env=env).stderr
    refused = stack_ctl("up", "--brokers", "1", env=env, check=False)
    assert refused.returncode == 1
    assert "set up with 3 broker(s), not 1" in refused.stderr.strip().splitlines()[-1]


def test_up_fails_with_one_line_reason_when_a_port_is_taken(
    isolated_stack: dict[str, str],
) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", int(isolated_stack["STACK_REDIS_PORT"])))
        squatter.listen()
        result = stack_ctl("start", "redis", env=isolated_stack, check=False)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("stack: error: ")
    assert f"127.0.0.1:{isolated_stack['STACK_REDIS_PORT']} is already in use" in last


def test_wait_for_reports_the_message_and_last_error_on_deadline() -> None:
    def failing() -> bool:
        raise ValueError("still broken")

    with pytest.raises(AssertionError, match=r"thing happened within 0\.1 s.*still broken"):
        wait_for(failing, 0.1, interval_s=0.01, message="thing happened")
    assert wait_for(lambda: 42, 1.0) == 42
