"""Typed settings, read from the environment only.

Three families of variables:

- ``BRIDGE_*``: the bridge's own settings (fields of :class:`Settings`);
- ``DOCUTRAY_*``, ``KAFKA_BOOTSTRAP_SERVERS`` and ``REDIS_URL``: the standard
  names for the things the bridge connects to;
- any other ``KAFKA_*`` variable passes straight through to librdkafka:
  ``KAFKA_SECURITY_PROTOCOL=SASL_SSL`` becomes ``security.protocol``
  (underscores become dots; write a literal underscore as ``__``), so
  SASL/TLS clusters work without code changes. Each name is checked against
  librdkafka when settings load: an unknown one stops start-up (Kubernetes
  service-link variables such as ``KAFKA_UI_SERVICE_HOST`` are ignored).

A bad value fails at start-up with one line naming the variable
(:func:`load_settings` raises :class:`SettingsError`); secret values are never
echoed.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from typing import Any, Literal

from confluent_kafka import KafkaException, Producer
from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.errors import BridgeError
from service.redis_url import RedisUrlError, parse_redis_url

#: Variables that are ours and must not be passed to librdkafka.
_KAFKA_RESERVED = frozenset({"KAFKA_BOOTSTRAP_SERVERS"})
#: Variables others set that are not librdkafka properties, ignored by the pass-through.
#: Kubernetes service links: every Service in the namespace gives `<NAME>_SERVICE_HOST`,
#: `<NAME>_SERVICE_PORT[_<port name>]`, `<NAME>_PORT` and `<NAME>_PORT_<n>_<TCP|UDP|SCTP>[_ADDR|
#: _PORT|_PROTO]`, so Services named `kafka`, `kafka-ui` or a Strimzi `kafka-kafka-bootstrap`
#: inject KAFKA_PORT, KAFKA_UI_SERVICE_HOST, KAFKA_UI_PORT_8080_TCP_ADDR... (the chart turns
#: them off with `enableServiceLinks: false`; this covers other manifests). Also the Kafka
#: distribution's own JVM settings (KAFKA_HEAP_OPTS...).
_KAFKA_FOREIGN = re.compile(
    r"^KAFKA_(?:\w+_)?(?:SERVICE_HOST|SERVICE_PORT(?:_\w+)?|PORT"
    r"|PORT_\d+_(?:TCP|UDP|SCTP)(?:_(?:ADDR|PORT|PROTO))?)$"
    r"|^KAFKA_(?:HEAP_OPTS|OPTS|JVM_.*|JMX_.*|LOG4J_.*|GC_.*)$"
)
#: A property librdkafka never has: set after a probed one, it stops the probe client's
#: configuration before any client is created (see `_librdkafka_refusal`).
_PROBE_SENTINEL = "docutray.bridge.unknown.probe"
#: Fragments that mark a librdkafka property (or any setting) as secret.
SECRET_MARKERS = ("password", "secret", "key", "token", "credential", "jaas")


class SettingsError(BridgeError):
    """A setting is missing or has a bad value."""


def _env(name: str) -> Any:
    return Field(validation_alias=AliasChoices(name, name.lower()))


class Settings(BaseSettings):
    """Every setting of the bridge. The README's settings table mirrors this class."""

    model_config = SettingsConfigDict(
        env_prefix="",
        case_sensitive=False,
        extra="ignore",
        populate_by_name=True,
        frozen=True,
    )

    # DocuTray
    docutray_api_key: SecretStr = Field(
        default=SecretStr(""),
        validation_alias=AliasChoices("DOCUTRAY_API_KEY", "docutray_api_key"),
        description="DocuTray API key (secret). Required by `run`.",
    )
    docutray_base_url: str = Field(
        default="https://app.docutray.com",
        validation_alias=AliasChoices("DOCUTRAY_BASE_URL", "docutray_base_url"),
        description="DocuTray API base URL.",
    )
    docutray_connect_timeout_s: float = Field(
        default=5.0, gt=0, validation_alias=AliasChoices("DOCUTRAY_CONNECT_TIMEOUT_S")
    )
    docutray_read_timeout_s: float = Field(
        default=30.0, gt=0, validation_alias=AliasChoices("DOCUTRAY_READ_TIMEOUT_S")
    )
    docutray_write_timeout_s: float = Field(
        default=60.0, gt=0, validation_alias=AliasChoices("DOCUTRAY_WRITE_TIMEOUT_S")
    )
    docutray_max_connections: int = Field(
        default=32, ge=1, validation_alias=AliasChoices("DOCUTRAY_MAX_CONNECTIONS")
    )

    # Connections
    kafka_bootstrap_servers: str = Field(
        default="localhost:9092",
        validation_alias=AliasChoices("KAFKA_BOOTSTRAP_SERVERS", "kafka_bootstrap_servers"),
    )
    redis_url: SecretStr = Field(
        default=SecretStr(""),
        validation_alias=AliasChoices("REDIS_URL", "redis_url"),
        description="Redis for the shared rate limit; empty = in-process limiter (one replica).",
    )

    # Topics and group
    group_id: str = Field(
        default="docutray-bridge", min_length=1, validation_alias=AliasChoices("BRIDGE_GROUP_ID")
    )
    input_topic: str = Field(
        default="docutray.requests",
        min_length=1,
        validation_alias=AliasChoices("BRIDGE_INPUT_TOPIC"),
    )
    result_topic: str = Field(
        default="docutray.results",
        min_length=1,
        validation_alias=AliasChoices("BRIDGE_RESULT_TOPIC"),
    )
    dead_letter_topic: str = Field(
        default="docutray.dead-letters",
        min_length=1,
        validation_alias=AliasChoices("BRIDGE_DEAD_LETTER_TOPIC"),
    )
    changelog_topic: str = Field(
        default="",
        validation_alias=AliasChoices("BRIDGE_CHANGELOG_TOPIC"),
        description="Compacted pending-conversion changelog; default `<group id>.pending-changelog`.",
    )
    create_topics: bool = Field(default=True, validation_alias=AliasChoices("BRIDGE_CREATE_TOPICS"))
    topic_partitions: int = Field(
        default=6, ge=1, validation_alias=AliasChoices("BRIDGE_TOPIC_PARTITIONS")
    )
    topic_replication_factor: int = Field(
        default=1, ge=1, validation_alias=AliasChoices("BRIDGE_TOPIC_REPLICATION_FACTOR")
    )
    max_result_bytes: int = Field(
        default=8 * 1024 * 1024,
        ge=1024,
        validation_alias=AliasChoices("BRIDGE_MAX_RESULT_BYTES"),
        description="max.message.bytes of a results topic the bridge creates.",
    )
    dedupe_window_s: float = Field(
        default=86_400.0,
        gt=0,
        validation_alias=AliasChoices("BRIDGE_DEDUPE_WINDOW_S"),
        description="How long a finished request id is remembered (dedupe topic retention).",
    )

    # Processing
    commit_interval_ms: int = Field(
        default=100, ge=5, le=10_000, validation_alias=AliasChoices("BRIDGE_COMMIT_INTERVAL_MS")
    )
    max_pending: int = Field(
        default=10_000, ge=1, validation_alias=AliasChoices("BRIDGE_MAX_PENDING")
    )
    memory_budget_mb: int = Field(
        default=512,
        ge=64,
        validation_alias=AliasChoices("BRIDGE_MEMORY_BUDGET_MB"),
        description="Memory the bridge plans for (the chart sets it from the container limit): "
        "pending states may hold a quarter, documents in flight a quarter, Kafka's client "
        "buffers an eighth each.",
    )
    max_inflight_bytes: int = Field(
        default=0,
        ge=0,
        validation_alias=AliasChoices("BRIDGE_MAX_INFLIGHT_BYTES"),
        description="Bytes of documents held for submits and dead letters at once; "
        "0: a quarter of BRIDGE_MEMORY_BUDGET_MB.",
    )
    max_inflight_submits: int = Field(
        default=256, ge=1, validation_alias=AliasChoices("BRIDGE_MAX_INFLIGHT_SUBMITS")
    )
    max_inflight_polls: int = Field(
        default=64, ge=1, validation_alias=AliasChoices("BRIDGE_MAX_INFLIGHT_POLLS")
    )
    max_request_bytes: int = Field(
        default=16 * 1024 * 1024,
        ge=1024,
        validation_alias=AliasChoices("BRIDGE_MAX_REQUEST_BYTES"),
        description="Largest input record accepted (bigger: dead letter `too_large`).",
    )
    max_document_bytes: int = Field(
        default=100 * 1024 * 1024,
        ge=1,
        validation_alias=AliasChoices("BRIDGE_MAX_DOCUMENT_BYTES"),
        description="Largest document (decoded size); DocuTray's own limit is 100 MB.",
    )
    max_header_bytes: int = Field(
        default=64 * 1024,
        ge=1024,
        validation_alias=AliasChoices("BRIDGE_MAX_HEADER_BYTES"),
        description="Most bytes of an input record's headers (keys and values), and of its key "
        "(bigger: dead letter `too_large`).",
    )
    retry_deadline_s: float = Field(
        default=900.0, gt=0, validation_alias=AliasChoices("BRIDGE_RETRY_DEADLINE_S")
    )
    retry_base_s: float = Field(
        default=1.0, gt=0, validation_alias=AliasChoices("BRIDGE_RETRY_BASE_S")
    )
    retry_cap_s: float = Field(
        default=60.0, gt=0, validation_alias=AliasChoices("BRIDGE_RETRY_CAP_S")
    )
    conversion_deadline_s: float = Field(
        default=3900.0, gt=0, validation_alias=AliasChoices("BRIDGE_CONVERSION_DEADLINE_S")
    )
    max_lost_resubmits: int = Field(
        default=2, ge=0, validation_alias=AliasChoices("BRIDGE_MAX_LOST_RESUBMITS")
    )
    unreachable_pause_after_s: float = Field(
        default=60.0, gt=0, validation_alias=AliasChoices("BRIDGE_UNREACHABLE_PAUSE_AFTER_S")
    )
    systemic_probe_interval_s: float = Field(
        default=15.0, gt=0, validation_alias=AliasChoices("BRIDGE_SYSTEMIC_PROBE_INTERVAL_S")
    )
    shutdown_grace_s: float = Field(
        default=25.0, gt=0, validation_alias=AliasChoices("BRIDGE_SHUTDOWN_GRACE_S")
    )

    # Rate limit
    submit_rate_per_minute: float = Field(
        default=60.0, gt=0, validation_alias=AliasChoices("BRIDGE_SUBMIT_RATE_PER_MINUTE")
    )
    status_rate_per_minute: float = Field(
        default=120.0, gt=0, validation_alias=AliasChoices("BRIDGE_STATUS_RATE_PER_MINUTE")
    )
    shared_budget: bool = Field(
        default=False, validation_alias=AliasChoices("BRIDGE_SHARED_BUDGET")
    )
    rate_burst: int = Field(default=5, ge=1, validation_alias=AliasChoices("BRIDGE_RATE_BURST"))
    submit_rate_per_hour: float = Field(
        default=0.0, ge=0, validation_alias=AliasChoices("BRIDGE_SUBMIT_RATE_PER_HOUR")
    )
    submit_rate_per_day: float = Field(
        default=0.0, ge=0, validation_alias=AliasChoices("BRIDGE_SUBMIT_RATE_PER_DAY")
    )
    expected_replicas: int = Field(
        default=1, ge=1, validation_alias=AliasChoices("BRIDGE_EXPECTED_REPLICAS")
    )

    # DocuTray's plan: quota, usage, webhooks (issue 14)
    quota_probe_interval_s: float = Field(
        default=300.0,
        gt=0,
        validation_alias=AliasChoices("BRIDGE_QUOTA_PROBE_INTERVAL_S"),
        description="After a 402 without a resetDate, submissions are tried again this often.",
    )
    usage_poll_interval_s: float = Field(
        default=300.0,
        ge=0,
        validation_alias=AliasChoices("BRIDGE_USAGE_POLL_INTERVAL_S"),
        description="One replica at a time reads GET /api/usage this often (0: never).",
    )
    monthly_page_budget: int = Field(
        default=0, ge=0, validation_alias=AliasChoices("BRIDGE_MONTHLY_PAGE_BUDGET")
    )
    webhooks_enabled: bool = Field(
        default=False, validation_alias=AliasChoices("BRIDGE_WEBHOOKS_ENABLED")
    )
    webhook_port: int = Field(
        default=9401, ge=0, le=65535, validation_alias=AliasChoices("BRIDGE_WEBHOOK_PORT")
    )
    webhook_host: str = Field(
        default="0.0.0.0", validation_alias=AliasChoices("BRIDGE_WEBHOOK_HOST")
    )
    webhook_max_body_bytes: int = Field(
        default=4 * 1024 * 1024,
        ge=1024,
        validation_alias=AliasChoices("BRIDGE_WEBHOOK_MAX_BODY_BYTES"),
    )
    webhook_rate_per_source: float = Field(
        default=50.0,
        gt=0,
        validation_alias=AliasChoices("BRIDGE_WEBHOOK_RATE_PER_SOURCE"),
        description="Posts per second one source address may make (burst: twice as many).",
    )
    webhook_fallback_poll_s: float = Field(
        default=30.0,
        gt=0,
        validation_alias=AliasChoices("BRIDGE_WEBHOOK_FALLBACK_POLL_S"),
        description="With webhooks on, no status call comes sooner than this after the "
        "previous one (or the submit) unless a webhook wakes it.",
    )

    # Polling
    poll_default_median_s: float = Field(
        default=5.0, gt=0, validation_alias=AliasChoices("BRIDGE_POLL_DEFAULT_MEDIAN_S")
    )
    poll_first_quantile: float = Field(
        default=0.65, gt=0, lt=1, validation_alias=AliasChoices("BRIDGE_POLL_FIRST_QUANTILE")
    )
    poll_min_interval_s: float = Field(
        default=0.5, gt=0, validation_alias=AliasChoices("BRIDGE_POLL_MIN_INTERVAL_S")
    )
    poll_max_interval_s: float = Field(
        default=30.0, gt=0, validation_alias=AliasChoices("BRIDGE_POLL_MAX_INTERVAL_S")
    )

    # Fetch mode
    fetch_mode: bool = Field(default=False, validation_alias=AliasChoices("BRIDGE_FETCH_MODE"))
    fetch_allow_private: bool = Field(
        default=False, validation_alias=AliasChoices("BRIDGE_FETCH_ALLOW_PRIVATE")
    )
    fetch_timeout_s: float = Field(
        default=30.0, gt=0, validation_alias=AliasChoices("BRIDGE_FETCH_TIMEOUT_S")
    )

    # Operations
    metrics_port: int = Field(
        default=9400, ge=0, le=65535, validation_alias=AliasChoices("BRIDGE_METRICS_PORT")
    )
    metrics_host: str = Field(
        default="0.0.0.0", validation_alias=AliasChoices("BRIDGE_METRICS_HOST")
    )
    log_format: Literal["auto", "json", "console"] = Field(
        default="auto", validation_alias=AliasChoices("BRIDGE_LOG_FORMAT")
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", validation_alias=AliasChoices("BRIDGE_LOG_LEVEL")
    )
    restore_timeout_s: float = Field(
        default=120.0,
        gt=0,
        validation_alias=AliasChoices("BRIDGE_RESTORE_TIMEOUT_S"),
        description="After this long waiting for an open transaction, a restore is reported stuck "
        "(it keeps waiting: reading past it would publish second outcomes).",
    )
    heartbeat_timeout_s: float = Field(
        default=90.0, gt=0, validation_alias=AliasChoices("BRIDGE_HEARTBEAT_TIMEOUT_S")
    )
    instance_id: str = Field(
        default="",
        validation_alias=AliasChoices("BRIDGE_INSTANCE_ID", "HOSTNAME"),
        description="Stable replica identity: group.instance.id and the transactional id; "
        "default: host name + pid.",
    )

    @field_validator("log_format", "log_level", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @field_validator("redis_url")
    @classmethod
    def _redis_url_form(cls, value: SecretStr) -> SecretStr:
        # One of the forms in service/redis_url.py (one server, TLS, Sentinel, Cluster).
        if value.get_secret_value():
            try:
                parse_redis_url(value.get_secret_value())
            except RedisUrlError as exc:
                raise ValueError(str(exc)) from None
        return value

    @property
    def changelog(self) -> str:
        """The changelog topic name (explicit, or derived from the group id)."""
        return self.changelog_topic or f"{self.group_id}.pending-changelog"

    @property
    def pending_bytes_cap(self) -> int:
        """Bytes the pending entries may hold before consumption pauses."""
        return self.memory_budget_mb * 1024 * 1024 // 4

    @property
    def inflight_bytes_cap(self) -> int:
        """Bytes of documents held at once (read back for submits and dead letters)."""
        return self.max_inflight_bytes or self.memory_budget_mb * 1024 * 1024 // 4

    @property
    def kafka_buffer_kbytes(self) -> int:
        """Kilobytes each Kafka client may buffer (consumer prefetch, producer queue)."""
        return max(4096, self.memory_budget_mb * 1024 // 8)

    @property
    def redis(self) -> str | None:
        """The Redis URL, or None for the in-process limiter."""
        return self.redis_url.get_secret_value() or None


KafkaClientKind = Literal["common", "consumer", "producer"]
_CLIENT_PREFIXES = {"consumer": "KAFKA_CONSUMER_", "producer": "KAFKA_PRODUCER_"}


def kafka_passthrough(
    environ: Mapping[str, str] | None = None, *, kind: KafkaClientKind = "common"
) -> dict[str, str]:
    """librdkafka properties from the environment.

    ``common``: every ``KAFKA_*`` variable (except the bridge's own, Kubernetes
    service links and JVM settings) for every client. ``consumer`` /
    ``producer``: ``KAFKA_CONSUMER_*`` / ``KAFKA_PRODUCER_*`` for that client
    only (e.g. ``KAFKA_CONSUMER_SESSION_TIMEOUT_MS``), so that a client never
    gets properties that are not its own.
    """
    return {prop: value for _, prop, value in _passthrough_items(environ, kind)}


def _passthrough_items(
    environ: Mapping[str, str] | None, kind: KafkaClientKind
) -> list[tuple[str, str, str]]:
    """(variable, librdkafka property, value) of every pass-through variable of `kind`."""
    env = os.environ if environ is None else environ
    out: list[tuple[str, str, str]] = []
    for name, value in env.items():
        upper = name.upper()
        if not upper.startswith("KAFKA_") or _KAFKA_FOREIGN.match(upper):
            continue
        if kind == "common":
            if upper in _KAFKA_RESERVED or upper.startswith(tuple(_CLIENT_PREFIXES.values())):
                continue
            prefix = "KAFKA_"
        else:
            prefix = _CLIENT_PREFIXES[kind]
            if not upper.startswith(prefix):
                continue
        prop = upper[len(prefix) :].lower().replace("__", "\0").replace("_", ".")
        out.append((name, prop.replace("\0", "_"), value))
    return out


def _librdkafka_refusal(prop: str, value: str) -> str | None:
    """librdkafka's reason to refuse `prop=value` (unknown name, bad value), or None.

    librdkafka has no public list of its properties; its configuration call is the
    authority. The probe sets the property, then `_PROBE_SENTINEL`, which is always
    unknown: configuration stops there, so no client (thread, socket) is ever created.
    Cross-property checks that run when a real client is created are not made here.
    """
    try:
        Producer({prop: value, _PROBE_SENTINEL: "1"})
    except KafkaException as exc:
        reason = str(exc.args[0].str()) if exc.args else str(exc)
    except (TypeError, ValueError) as exc:  # confluent-kafka's own keys (error_cb...) want code
        reason = str(exc)
    else:  # pragma: no cover - the sentinel cannot be set
        return None
    if f'"{_PROBE_SENTINEL}"' in reason:
        return None
    return " ".join(reason.split())


def check_kafka_passthrough(environ: Mapping[str, str] | None = None) -> None:
    """Refuse a pass-through variable that librdkafka does not take, naming the variable.

    Service-link shapes and the Kafka distribution's variables are ignored (see
    `_KAFKA_FOREIGN`); anything else that is not a librdkafka property raises
    SettingsError with one line. A value librdkafka refuses (wrong type, out of range)
    does too; a secret property's value is never echoed.
    """
    kinds: tuple[KafkaClientKind, ...] = ("common", "consumer", "producer")
    for kind in kinds:
        for variable, prop, value in _passthrough_items(environ, kind):
            reason = _librdkafka_refusal(prop, value)
            if reason is None:
                continue
            if reason.startswith("No such configuration property"):
                raise SettingsError(
                    f"unknown setting {variable}: librdkafka has no property {prop!r} "
                    "(KAFKA_* variables pass through to librdkafka: underscores become dots, "
                    "__ an underscore)"
                )
            if is_secret_property(prop):
                raise SettingsError(f"invalid setting {variable}: librdkafka refuses its value")
            raise SettingsError(f"invalid setting {variable}: {reason}")


def kafka_common_config(
    settings: Settings, environ: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """librdkafka settings shared by every client: bootstrap servers plus the pass-through.

    librdkafka's own log lines go to the ``librdkafka`` logger (served when a client is
    polled), so they join the JSON stream instead of printing plain lines on stderr.
    """
    conf: dict[str, Any] = {
        "bootstrap.servers": settings.kafka_bootstrap_servers,
        "logger": logging.getLogger("librdkafka"),
    }
    conf.update(kafka_passthrough(environ))
    return conf


def is_secret_property(name: str) -> bool:
    """Whether a librdkafka property (or setting name) holds a secret."""
    lowered = name.lower()
    return any(marker in lowered for marker in SECRET_MARKERS)


def redacted(conf: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a config mapping safe to log: secret values replaced by ``***``, and
    objects (the logger, callbacks) left out."""
    return {
        k: ("***" if is_secret_property(k) else v)
        for k, v in conf.items()
        if isinstance(v, str | int | float | bool)
    }


def _variable_name(loc: tuple[int | str, ...]) -> str:
    field = str(loc[0]) if loc else "?"
    info = Settings.model_fields.get(field)
    if info is not None and isinstance(info.validation_alias, AliasChoices):
        first = info.validation_alias.choices[0]
        if isinstance(first, str):
            return first
    return field.upper()


def load_settings(**overrides: Any) -> Settings:
    """Read settings from the environment; raise SettingsError with one clear line on a bad value."""
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        err = exc.errors()[0]
        name = _variable_name(tuple(err.get("loc", ())))
        msg = err.get("msg", "invalid value")
        if is_secret_property(name) or name == "REDIS_URL":  # a URL may hold a password
            raise SettingsError(f"invalid setting {name}: {msg}") from None
        value = err.get("input")
        shown = f" (got {value!r})" if isinstance(value, str | int | float) else ""
        raise SettingsError(f"invalid setting {name}: {msg}{shown}") from None
    check_kafka_passthrough()
    return settings
