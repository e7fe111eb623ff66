"""Settings: defaults, every variable read from the environment, the Kafka pass-through,
one-line errors that name the variable and never echo a secret, redaction."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import KafkaException, Producer
from pydantic import SecretStr

from service.config import (
    Settings,
    SettingsError,
    is_secret_property,
    kafka_common_config,
    kafka_passthrough,
    load_settings,
    redacted,
)

API_KEY = "dtk_live_7f3a9c1e5b2d4f6a8c0e"
REDIS_PASSWORD = "r3d1s-pa55w0rd-9f8e7d"
SASL_PASSWORD = "sc4am-pa55w0rd-1a2b3c"


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """An environment with none of the variables the settings read."""
    for name in list(os.environ):
        upper = name.upper()
        if upper.startswith(("BRIDGE_", "DOCUTRAY_", "KAFKA_")) or upper in {
            "REDIS_URL",
            "HOSTNAME",
        }:
            monkeypatch.delenv(name)
    return monkeypatch


def env_name(field: str) -> str:
    """The environment variable a field reads (its first alias)."""
    alias = Settings.model_fields[field].validation_alias
    choices = getattr(alias, "choices", None)
    assert choices, f"{field} has no environment alias"
    first = choices[0]
    assert isinstance(first, str)
    return first


def other_value(field: str) -> tuple[str, Any]:
    """A valid, non-default value for a field: (as the environment spells it, as parsed)."""
    info = Settings.model_fields[field]
    default = info.default
    annotation = info.annotation
    if typing.get_origin(annotation) is typing.Literal:
        choice = next(c for c in typing.get_args(annotation) if c != default)
        return str(choice).upper(), choice  # case-insensitive on purpose
    if field == "redis_url":  # checked against the URL forms at load
        return "redis://:secret@redis-for-test:6379/0", "redis://:secret@redis-for-test:6379/0"
    if annotation is SecretStr:
        return f"secret-for-{field}", f"secret-for-{field}"
    if annotation is bool:
        return ("false" if default else "true"), not default
    if annotation is int:
        return str(default + 1), default + 1
    if annotation is float:
        return str(default / 2), default / 2
    if annotation is str:
        return f"value-of-{field}", f"value-of-{field}"
    raise AssertionError(f"no test value for {field}: {annotation}")


def test_defaults(clean_env: pytest.MonkeyPatch) -> None:
    s = load_settings()
    assert s.docutray_api_key.get_secret_value() == ""
    assert s.docutray_base_url == "https://app.docutray.com"
    assert s.kafka_bootstrap_servers == "localhost:9092"
    assert s.redis is None
    assert s.group_id == "docutray-bridge"
    assert s.input_topic == "docutray.requests"
    assert s.result_topic == "docutray.results"
    assert s.dead_letter_topic == "docutray.dead-letters"
    assert s.changelog == "docutray-bridge.pending-changelog"
    assert s.metrics_port == 9400
    assert s.max_request_bytes == 16 * 1024 * 1024
    assert s.max_document_bytes == 100 * 1024 * 1024
    assert s.log_format == "auto"
    assert s.log_level == "info"
    assert s.instance_id == ""


@pytest.mark.parametrize("field", sorted(Settings.model_fields))
def test_every_setting_is_read_from_its_variable(clean_env: pytest.MonkeyPatch, field: str) -> None:
    raw, parsed = other_value(field)
    clean_env.setenv(env_name(field), raw)
    value = getattr(load_settings(), field)
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    assert value == parsed


def test_every_bridge_setting_has_a_bridge_variable() -> None:
    own = {
        name
        for name in Settings.model_fields
        if not name.startswith(("docutray_", "kafka_", "redis_"))
    }
    assert own, "expected bridge-owned settings"
    for name in own:
        assert env_name(name) == f"BRIDGE_{name.upper()}"


def test_instance_id_falls_back_to_hostname(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("HOSTNAME", "bridge-7d9f-abcde")
    assert load_settings().instance_id == "bridge-7d9f-abcde"
    clean_env.setenv("BRIDGE_INSTANCE_ID", "replica-1")
    assert load_settings().instance_id == "replica-1"


def test_changelog_name_follows_group_unless_set(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("BRIDGE_GROUP_ID", "billing")
    assert load_settings().changelog == "billing.pending-changelog"
    clean_env.setenv("BRIDGE_CHANGELOG_TOPIC", "custom.changelog")
    assert load_settings().changelog == "custom.changelog"


def test_redis_url_empty_means_no_redis(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("REDIS_URL", "")
    assert load_settings().redis is None
    clean_env.setenv("REDIS_URL", "redis://127.0.0.1:6379/0")
    assert load_settings().redis == "redis://127.0.0.1:6379/0"


# --------------------------------------------------------------------------- pass-through


def test_kafka_passthrough_maps_names() -> None:
    env = {
        "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "KAFKA_SASL_USERNAME": "bridge",
        "KAFKA_SASL_PASSWORD": SASL_PASSWORD,
        "KAFKA_SSL_CA_LOCATION": "/etc/ssl/ca.pem",
        "KAFKA_SOME__ODD_NAME": "x",
        "KAFKA_BOOTSTRAP_SERVERS": "broker:9092",
        "BRIDGE_GROUP_ID": "g",
        "PATH": "/usr/bin",
    }
    assert kafka_passthrough(env) == {
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "bridge",
        "sasl.password": SASL_PASSWORD,
        "ssl.ca.location": "/etc/ssl/ca.pem",
        "some_odd.name": "x",
    }


def test_kafka_passthrough_reads_the_process_environment(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("KAFKA_CLIENT_ID", "from-env")
    clean_env.setenv("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:19092")
    assert kafka_passthrough() == {"client.id": "from-env"}


def test_kafka_common_config_owns_bootstrap_servers(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:19092")
    settings = load_settings()
    conf = kafka_common_config(settings, {"KAFKA_SECURITY_PROTOCOL": "PLAINTEXT"})
    logger = conf.pop("logger")
    assert conf == {"bootstrap.servers": "127.0.0.1:19092", "security.protocol": "PLAINTEXT"}
    assert logger.name == "librdkafka"  # librdkafka's lines join the JSON stream
    assert "logger" not in redacted(kafka_common_config(settings))  # printable settings only


def _librdkafka_accepts(conf: dict[str, Any]) -> None:
    """Build (and drop) a producer: librdkafka validates every property at construction."""
    producer = Producer({**conf, "bootstrap.servers": "127.0.0.1:9", "log_level": 0})
    producer.flush(0)


def test_passthrough_of_sasl_settings_is_accepted_by_librdkafka() -> None:
    env = {
        "KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "KAFKA_SASL_USERNAME": "bridge",
        "KAFKA_SASL_PASSWORD": SASL_PASSWORD,
        "KAFKA_ENABLE_SSL_CERTIFICATE_VERIFICATION": "true",
    }
    _librdkafka_accepts(kafka_passthrough(env))


def test_kubernetes_service_link_variables_do_not_break_the_kafka_client() -> None:
    env = {
        "KAFKA_SECURITY_PROTOCOL": "PLAINTEXT",
        "KAFKA_PORT": "tcp://10.96.12.7:9092",
        "KAFKA_PORT_9092_TCP": "tcp://10.96.12.7:9092",
        "KAFKA_PORT_9092_TCP_ADDR": "10.96.12.7",
        "KAFKA_PORT_9092_TCP_PORT": "9092",
        "KAFKA_PORT_9092_TCP_PROTO": "tcp",
        "KAFKA_SERVICE_HOST": "10.96.12.7",
        "KAFKA_SERVICE_PORT": "9092",
    }
    try:
        _librdkafka_accepts(kafka_passthrough(env))
    except KafkaException as exc:
        pytest.fail(f"librdkafka refused the pass-through: {exc}")


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("BRIDGE_MAX_PENDING", "abc"),
        ("BRIDGE_MAX_PENDING", "0"),
        ("BRIDGE_MAX_PENDING", "1\n2"),
        ("BRIDGE_METRICS_PORT", "70000"),
        ("BRIDGE_LOG_FORMAT", "xml"),
        ("BRIDGE_LOG_LEVEL", "loud"),
        ("BRIDGE_CREATE_TOPICS", "maybe"),
        ("BRIDGE_POLL_FIRST_QUANTILE", "1.5"),
        ("BRIDGE_GROUP_ID", ""),
        ("BRIDGE_MAX_REQUEST_BYTES", "10"),
        ("DOCUTRAY_READ_TIMEOUT_S", "-1"),
    ],
)
def test_bad_value_is_one_line_naming_the_variable(
    clean_env: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    clean_env.setenv(variable, value)
    with pytest.raises(SettingsError) as info:
        load_settings()
    message = str(info.value)
    assert "\n" not in message
    assert "\r" not in message
    assert message.startswith(f"invalid setting {variable}:")


def test_bad_value_error_never_contains_secrets(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("DOCUTRAY_API_KEY", API_KEY)
    clean_env.setenv("REDIS_URL", f"redis://bridge:{REDIS_PASSWORD}@127.0.0.1:6379/0")
    clean_env.setenv("KAFKA_SASL_PASSWORD", SASL_PASSWORD)
    clean_env.setenv("BRIDGE_MAX_PENDING", "abc")
    with pytest.raises(SettingsError) as info:
        load_settings()
    message = str(info.value)
    assert "BRIDGE_MAX_PENDING" in message
    for secret in (API_KEY, REDIS_PASSWORD, SASL_PASSWORD):
        assert secret not in message
        assert secret not in repr(info.value)
    # The pydantic ValidationError (which holds every input) is not chained.
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__


def test_invalid_secret_setting_does_not_echo_its_value(clean_env: pytest.MonkeyPatch) -> None:
    # The environment only yields strings (always valid for a secret); a programmatic
    # override is the way a secret field can be invalid.
    with pytest.raises(SettingsError) as info:
        load_settings(docutray_api_key=987654321987)
    message = str(info.value)
    assert message.startswith("invalid setting DOCUTRAY_API_KEY:")
    assert "987654321987" not in message


def test_settings_repr_masks_secrets(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("DOCUTRAY_API_KEY", API_KEY)
    clean_env.setenv("REDIS_URL", f"redis://bridge:{REDIS_PASSWORD}@127.0.0.1:6379/0")
    s = load_settings()
    for text in (repr(s), str(s), s.model_dump_json()):
        assert API_KEY not in text
        assert REDIS_PASSWORD not in text
    assert s.docutray_api_key.get_secret_value() == API_KEY


# --------------------------------------------------------------------------- redaction


@pytest.mark.parametrize(
    "name",
    [
        "sasl.password",
        "ssl.key.password",
        "ssl.keystore.password",
        "ssl.key.pem",
        "sasl.oauthbearer.client.secret",
        "sasl.jaas.config",
        "DOCUTRAY_API_KEY",
        "api_token",
    ],
)
def test_secret_properties_are_recognised(name: str) -> None:
    assert is_secret_property(name)


@pytest.mark.parametrize(
    "name", ["bootstrap.servers", "sasl.username", "security.protocol", "client.id"]
)
def test_plain_properties_are_not_secret(name: str) -> None:
    assert not is_secret_property(name)


def test_redacted_masks_password_secret_and_key_values() -> None:
    conf = {
        "bootstrap.servers": "b:9092",
        "sasl.username": "bridge",
        "sasl.password": SASL_PASSWORD,
        "sasl.oauthbearer.client.secret": "oauth-secret-value",
        "ssl.key.password": "key-pass-value",
    }
    out = redacted(conf)
    assert out == {
        "bootstrap.servers": "b:9092",
        "sasl.username": "bridge",
        "sasl.password": "***",
        "sasl.oauthbearer.client.secret": "***",
        "ssl.key.password": "***",
    }
    assert conf["sasl.password"] == SASL_PASSWORD  # a copy: the input is untouched


def test_client_specific_kafka_variables_reach_only_their_client():
    env = {
        "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "KAFKA_CONSUMER_SESSION_TIMEOUT_MS": "10000",
        "KAFKA_PRODUCER_LINGER_MS": "20",
    }
    assert kafka_passthrough(env) == {"security.protocol": "SASL_SSL"}
    assert kafka_passthrough(env, kind="consumer") == {"session.timeout.ms": "10000"}
    assert kafka_passthrough(env, kind="producer") == {"linger.ms": "20"}


# --------------------------------------------------------------------------- pass-through names

SERVICE_LINK_VARIABLES = {
    # A Service named kafka-ui (port 8080) in the namespace.
    "KAFKA_UI_SERVICE_HOST": "10.0.0.1",
    "KAFKA_UI_SERVICE_PORT": "8080",
    "KAFKA_UI_SERVICE_PORT_HTTP": "8080",
    "KAFKA_UI_PORT": "tcp://10.0.0.1:8080",
    "KAFKA_UI_PORT_8080_TCP": "tcp://10.0.0.1:8080",
    "KAFKA_UI_PORT_8080_TCP_ADDR": "10.0.0.1",
    "KAFKA_UI_PORT_8080_TCP_PORT": "8080",
    "KAFKA_UI_PORT_8080_TCP_PROTO": "tcp",
    # A Strimzi cluster named kafka: its bootstrap Service.
    "KAFKA_KAFKA_BOOTSTRAP_SERVICE_HOST": "10.0.0.2",
    "KAFKA_KAFKA_BOOTSTRAP_SERVICE_PORT_TCP_REPLICATION": "9091",
    "KAFKA_KAFKA_BOOTSTRAP_PORT_9093_TCP_ADDR": "10.0.0.2",
    # A Service named kafka, UDP and SCTP ports, a Service named kafka-consumer.
    "KAFKA_PORT": "tcp://10.0.0.3:9092",
    "KAFKA_SERVICE_HOST": "10.0.0.3",
    "KAFKA_METRICS_PORT_53_UDP_PROTO": "udp",
    "KAFKA_GW_PORT_9999_SCTP": "sctp://10.0.0.4:9999",
    "KAFKA_CONSUMER_SERVICE_HOST": "10.0.0.5",
    "KAFKA_PRODUCER_PORT_80_TCP": "tcp://10.0.0.6:80",
}


def _one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


def test_service_link_variables_are_ignored(clean_env: pytest.MonkeyPatch) -> None:
    for name, value in SERVICE_LINK_VARIABLES.items():
        clean_env.setenv(name, value)
    clean_env.setenv("KAFKA_CLIENT_ID", "bridge")
    load_settings()  # does not raise
    assert kafka_passthrough() == {"client.id": "bridge"}
    assert kafka_passthrough(kind="consumer") == {}
    assert kafka_passthrough(kind="producer") == {}


@pytest.mark.parametrize("variable", sorted(SERVICE_LINK_VARIABLES))
def test_ignored_service_link_shapes_are_not_librdkafka_properties(variable: str) -> None:
    """Ignoring the shape hides nothing: librdkafka has no property of that name."""
    prop = variable.removeprefix("KAFKA_").lower().replace("_", ".")
    with pytest.raises(KafkaException, match="No such configuration property"):
        Producer({prop: "1"})


@pytest.mark.parametrize(
    "variable",
    ["KAFKA_BOGUS_THING", "KAFKA_SECURITY_PROTOCOLL", "KAFKA_CONSUMER_BOGUS", "KAFKA_PRODUCER_X"],
)
def test_unknown_kafka_variable_stops_loading(clean_env: pytest.MonkeyPatch, variable: str) -> None:
    clean_env.setenv(variable, "1")
    with pytest.raises(SettingsError) as info:
        load_settings()
    message = _one_line(str(info.value))
    assert message.startswith(f"unknown setting {variable}: librdkafka has no property")


def test_refused_kafka_value_names_the_variable(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("KAFKA_SECURITY_PROTOCOL", "nope")
    with pytest.raises(SettingsError) as info:
        load_settings()
    message = _one_line(str(info.value))
    assert message.startswith("invalid setting KAFKA_SECURITY_PROTOCOL:")
    assert "nope" in message
    clean_env.setenv("KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    clean_env.setenv("KAFKA_PRODUCER_LINGER_MS", "-5")
    with pytest.raises(SettingsError, match=r"^invalid setting KAFKA_PRODUCER_LINGER_MS: .*range"):
        load_settings()


def test_refused_secret_value_is_not_echoed(
    clean_env: pytest.MonkeyPatch, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every secret librdkafka property takes any string, so pretend one with a typed value is.
    monkeypatch.setattr("service.config.is_secret_property", lambda name: True)
    clean_env.setenv("KAFKA_SECURITY_PROTOCOL", "hunter2-secret")
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert (
        str(info.value) == "invalid setting KAFKA_SECURITY_PROTOCOL: librdkafka refuses its value"
    )


def test_known_kafka_variables_load(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    clean_env.setenv("KAFKA_SASL_MECHANISM", "SCRAM-SHA-512")
    clean_env.setenv("KAFKA_SASL_PASSWORD", SASL_PASSWORD)
    clean_env.setenv("KAFKA_SSL_CA_LOCATION", "/does/not/exist/ca.crt")  # read by the client only
    clean_env.setenv("KAFKA_CONSUMER_SESSION_TIMEOUT_MS", "6000")
    clean_env.setenv("KAFKA_PRODUCER_LINGER_MS", "20")
    clean_env.setenv("KAFKA_HEAP_OPTS", "-Xmx1g")
    load_settings()  # does not raise


def test_the_name_check_creates_no_client(
    clean_env: pytest.MonkeyPatch, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The probe stops inside configuration: no librdkafka client (threads, sockets) is made."""
    made: list[dict[str, str]] = []

    class Recording(Producer):  # type: ignore[misc]
        def __init__(self, conf: dict[str, str]) -> None:
            super().__init__(conf)
            made.append(conf)  # reached only when a client was really created

    monkeypatch.setattr("service.config.Producer", Recording)
    clean_env.setenv("KAFKA_SECURITY_PROTOCOL", "SSL")
    clean_env.setenv("KAFKA_CONSUMER_GROUP_ID", "g")
    load_settings()
    assert made == []
    Recording({"log_level": "0"})  # the recorder itself works
    assert len(made) == 1


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.upper().startswith(("BRIDGE_", "DOCUTRAY_", "KAFKA_")) and k != "REDIS_URL"
    }
    exe = Path(sys.executable).parent / "docutray-bridge"
    return subprocess.run(
        [str(exe), *args], env={**base, **env}, capture_output=True, text=True, timeout=60
    )


def test_run_with_an_unknown_kafka_variable_exits_2_with_one_line() -> None:
    proc = _cli("run", env={"KAFKA_BOGUS_THING": "1", "DOCUTRAY_API_KEY": API_KEY})
    assert proc.returncode == 2, proc.stderr
    line = _one_line(proc.stderr)
    assert line.startswith("error: unknown setting KAFKA_BOGUS_THING: ")
    assert "'bogus.thing'" in line
    assert "Traceback" not in proc.stderr


def test_run_ignores_a_kubernetes_service_link() -> None:
    env = {"KAFKA_UI_PORT_8080_TCP": "tcp://10.0.0.1:8080"}
    # Without an API key `run` stops right after the settings loaded: past the name check.
    proc = _cli("run", env=env)
    assert proc.returncode == 2
    assert _one_line(proc.stderr) == "error: DOCUTRAY_API_KEY is not set"
    shown = _cli("settings", env=env)
    assert shown.returncode == 0, shown.stderr
    kafka = json.loads(shown.stdout)["kafka"]
    assert kafka == {"bootstrap.servers": "localhost:9092"}
