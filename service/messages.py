"""The wire format: every message the bridge reads or writes.

These pydantic models are the public contract with upstream producers and
downstream readers. Their JSON Schemas are generated into ``schemas/`` by
``docutray-bridge schemas`` (a test fails when a file there is stale).

- :class:`DocumentRequest`: the input record's value (UTF-8 JSON; key = request id).
- :class:`ConversionResult`: the result topic (key = request id).
- :class:`DeadLetter`: the dead-letter topic (key = request id when known).
- :class:`PendingRecord`: the compacted changelog of pending conversions
  (internal, but documented so operators can read it).
"""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

SCHEMA_VERSION: Literal[1] = 1

#: MIME types DocuTray accepts (see the API contract).
SUPPORTED_CONTENT_TYPES: tuple[str, ...] = (
    "image/jpeg",
    "image/png",
    "image/gif",
    "image/bmp",
    "image/webp",
    "application/pdf",
)
ContentType = Literal[
    "image/jpeg", "image/png", "image/gif", "image/bmp", "image/webp", "application/pdf"
]

RequestId = Annotated[
    str,
    StringConstraints(min_length=1, max_length=256, pattern=r"^[\x21-\x7e]+$"),
    Field(description="Idempotency and correlation key: printable ASCII, no spaces, 1-256 chars."),
]


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DocumentSource(_Model):
    """Where the document comes from: exactly one of ``url`` or ``base64`` (with ``content_type``)."""

    url: Annotated[
        str | None,
        Field(
            default=None,
            max_length=8192,
            pattern=r"^https?://",
            description="An http(s) URL DocuTray (or, in fetch mode, the bridge) downloads.",
        ),
    ] = None
    base64: Annotated[
        str | None,
        Field(
            default=None,
            description="The document's bytes, base64-encoded (a `data:<mime>;base64,` URI is "
            "accepted too).",
        ),
    ] = None
    content_type: Annotated[
        ContentType | None,
        Field(
            default=None,
            description="MIME type of the document; required with `base64` unless it is a data URI.",
        ),
    ] = None

    @field_validator("content_type", mode="before")
    @classmethod
    def _normalise_content_type(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.strip().lower()
            return {"image/jpg": "image/jpeg", "image/x-ms-bmp": "image/bmp"}.get(value, value)
        return value

    @model_validator(mode="after")
    def _exactly_one(self) -> DocumentSource:
        if (self.url is None) == (self.base64 is None):
            raise ValueError("source must have exactly one of 'url' or 'base64'")
        if (
            self.base64 is not None
            and self.content_type is None
            and not self.base64.startswith("data:")
        ):
            raise ValueError("source.content_type is required with source.base64")
        return self


#: The key of `document_metadata` the bridge sends to DocuTray to route webhooks back to the
#: request's partition (``{"request_id": ..., "partition": ...}``); never in a result, and a
#: request whose own metadata uses it is rejected as ``invalid_request``.
ROUTE_METADATA_KEY = "_docutray_bridge"


class DocumentRequest(_Model):
    """A request to convert one document (the input topic's record value)."""

    request_id: RequestId
    document_type_code: Annotated[
        str,
        StringConstraints(min_length=1, max_length=128),
        Field(description="DocuTray document type code, e.g. `invoice`, `receipt`, `id_card`."),
    ]
    source: DocumentSource
    metadata: Annotated[
        dict[str, Any] | None,
        Field(
            default=None,
            description="Free-form object forwarded to DocuTray as `document_metadata` and echoed "
            "back on the result.",
        ),
    ] = None
    filename: Annotated[
        str | None,
        Field(default=None, max_length=255, description="Original file name, for humans."),
    ] = None


class ConversionTimings(_Model):
    """When each step happened (ISO-8601 UTC)."""

    received_at: datetime = Field(description="The bridge accepted the request.")
    submitted_at: datetime | None = Field(
        default=None, description="DocuTray accepted the conversion (last successful submit)."
    )
    completed_at: datetime | None = Field(
        default=None,
        description="DocuTray finished (its `response_timestamp`, or when the bridge saw it).",
    )
    published_at: datetime = Field(description="The bridge published this message.")
    status_calls: int = Field(default=0, ge=0, description="Status calls spent on the conversion.")
    submit_attempts: int = Field(
        default=0, ge=0, description="Submit attempts (including retries)."
    )


class ConversionResult(_Model):
    """The extracted data of one finished conversion (the result topic's record value)."""

    schema_version: Literal[1] = SCHEMA_VERSION
    request_id: RequestId
    conversion_id: str = Field(description="DocuTray's conversion id.")
    document_type_code: str
    status: Literal["SUCCESS"] = "SUCCESS"
    data: dict[str, Any] = Field(
        description="Extracted data, shaped by the document type's JSON Schema at DocuTray."
    )
    metadata: dict[str, Any] | None = Field(default=None, description="Echo of the request's.")
    filename: str | None = None
    original_filename: str | None = Field(
        default=None, description="The file name DocuTray recorded."
    )
    pages: int | None = Field(
        default=None,
        ge=0,
        exclude_if=lambda value: value is None,
        description="Pages DocuTray converted, when its status answer reports them "
        "(absent otherwise).",
    )
    timings: ConversionTimings


class DeadLetterReason(StrEnum):
    """Why a request could not be converted (a closed set; see the README's table)."""

    MALFORMED_RECORD = "malformed_record"
    """The record is not UTF-8 JSON (or not an object)."""
    INVALID_REQUEST = "invalid_request"
    """The JSON does not match the request schema, or DocuTray answered 400."""
    UNSUPPORTED_FORMAT = "unsupported_format"
    """The document is not JPEG, PNG, GIF, BMP, WebP or PDF."""
    TOO_LARGE = "too_large"
    """The record or the document is over the size limit (DocuTray: 100 MB)."""
    SOURCE_UNAVAILABLE = "source_unavailable"
    """The document URL could not be downloaded (404, timeout)."""
    FORBIDDEN_SOURCE = "forbidden_source"
    """Fetch mode refused the URL (private or loopback address)."""
    CONVERSION_FAILED = "conversion_failed"
    """DocuTray finished the conversion with status ERROR."""
    CONVERSION_LOST = "conversion_lost"
    """DocuTray no longer knows the conversion (404/403) after the allowed resubmissions."""
    TIMEOUT = "timeout"
    """No terminal status before the conversion deadline."""
    RETRIES_EXHAUSTED = "retries_exhausted"
    """Transient errors (429, 5xx, timeouts) went on past the retry deadline."""
    REQUEST_ID_CONFLICT = "request_id_conflict"
    """A different request reused the id of one pending or finished within the dedupe window."""
    RESULT_TOO_LARGE = "result_too_large"
    """The result is larger than the results topic takes; fetch it from DocuTray."""


class EncodedBytes(_Model):
    """Raw bytes kept intact: as text when valid UTF-8, otherwise base64."""

    encoding: Literal["utf-8", "base64"]
    data: str

    @classmethod
    def of(cls, raw: bytes | str | None) -> EncodedBytes | None:
        """Encode raw bytes losslessly (None stays None)."""
        if raw is None:
            return None
        if isinstance(raw, str):
            return cls(encoding="utf-8", data=raw)
        try:
            return cls(encoding="utf-8", data=raw.decode("utf-8"))
        except UnicodeDecodeError:
            return cls(encoding="base64", data=base64.b64encode(raw).decode("ascii"))

    def raw(self) -> bytes:
        """The original bytes."""
        if self.encoding == "utf-8":
            return self.data.encode("utf-8")
        return base64.b64decode(self.data)


def _unset(value: object) -> bool:
    """Fields added for hostile records are left out of the JSON while unset (no cost to others)."""
    return value is None or value is False


class OriginalHeader(_Model):
    """One Kafka header of the original record.

    A header too large to keep whole has ``value_truncated``: ``value`` then holds
    a prefix, ``value_size`` and ``value_sha256`` describe the whole value.
    """

    key: str = Field(
        description="The header key (bytes that are not UTF-8 appear as U+FFFD; see `key_bytes`)."
    )
    value: EncodedBytes | None
    key_bytes: EncodedBytes | None = Field(
        default=None,
        exclude_if=_unset,
        description="The key's exact bytes, when they are not UTF-8.",
    )
    key_lost: bool = Field(
        default=False,
        exclude_if=_unset,
        description="The key is not UTF-8 and the Kafka client could not recover its bytes.",
    )
    value_truncated: bool = Field(
        default=False, exclude_if=_unset, description="`value` is only a prefix of the value."
    )
    value_size: int | None = Field(
        default=None, exclude_if=_unset, description="Size of the whole value in bytes."
    )
    value_sha256: str | None = Field(
        default=None, exclude_if=_unset, description="SHA-256 (hex) of the whole value."
    )

    @property
    def complete(self) -> bool:
        """Key and value are both exactly as consumed."""
        return not (self.key_lost or self.value_truncated)


class OriginalRecord(_Model):
    """The input record exactly as consumed, so it can be inspected or replayed.

    A dead letter must fit its topic, so a record too large to carry whole is cut:
    ``value_truncated`` (or ``key_truncated``) says ``value`` (``key``) holds only
    a prefix, with the whole part's size and SHA-256 beside it; ``headers_truncated``
    says headers were left out or cut (``headers_count``, ``headers_size``: all of
    them). These fields appear only when set.
    """

    topic: str
    partition: int
    offset: int
    timestamp_ms: int | None = None
    key: EncodedBytes | None = None
    value: EncodedBytes | None = None
    headers: list[OriginalHeader] = Field(default_factory=list)
    value_truncated: bool = Field(
        default=False, exclude_if=_unset, description="`value` is only a prefix of the value."
    )
    value_size: int | None = Field(
        default=None, exclude_if=_unset, description="Size of the whole value in bytes."
    )
    value_sha256: str | None = Field(
        default=None, exclude_if=_unset, description="SHA-256 (hex) of the whole value."
    )
    key_truncated: bool = Field(
        default=False, exclude_if=_unset, description="`key` is only a prefix of the key."
    )
    key_size: int | None = Field(
        default=None, exclude_if=_unset, description="Size of the whole key in bytes."
    )
    key_sha256: str | None = Field(
        default=None, exclude_if=_unset, description="SHA-256 (hex) of the whole key."
    )
    headers_truncated: bool = Field(
        default=False,
        exclude_if=_unset,
        description="Some headers are left out or cut (see each header's `value_truncated`).",
    )
    headers_count: int | None = Field(
        default=None, exclude_if=_unset, description="How many headers the record had."
    )
    headers_size: int | None = Field(
        default=None,
        exclude_if=_unset,
        description="Bytes of all the record's header keys and values.",
    )

    @property
    def truncated(self) -> bool:
        """Some part of the record is not kept exactly (cut, left out or unreadable)."""
        return (
            self.value_truncated
            or self.key_truncated
            or self.headers_truncated
            or not all(h.complete for h in self.headers)
        )

    def header_tuples(self) -> list[tuple[str, str | bytes | None]]:
        """The headers as confluent-kafka expects them (only those kept whole)."""
        return [
            (h.key, h.value.raw() if h.value is not None else None)
            for h in self.headers
            if h.complete
        ]


class DeadLetter(_Model):
    """A request that could not be converted, with everything needed to understand and replay it."""

    schema_version: Literal[1] = SCHEMA_VERSION
    request_id: str | None = Field(
        default=None, description="The request id, when the record could be read far enough."
    )
    reason: DeadLetterReason
    message: str = Field(description="What went wrong and what to do, for humans.")
    http_status: int | None = Field(default=None, description="DocuTray's HTTP status, if any.")
    api_error: dict[str, Any] | None = Field(
        default=None, description="DocuTray's error body, if any (never contains secrets)."
    )
    conversion_id: str | None = None
    document_type_code: str | None = None
    attempts: int = Field(default=0, ge=0, description="Submit attempts made.")
    status_calls: int = Field(default=0, ge=0)
    received_at: datetime | None = Field(default=None, description="The bridge first saw it.")
    failed_at: datetime = Field(description="The bridge gave up.")
    original: OriginalRecord


PendingState = Literal["queued", "submitting", "submitted"]


class DocumentRef(_Model):
    """Where a pending request's original record sits in ``<group>.pending-documents``."""

    partition: int = Field(description="Same partition number as the input record.")
    offset: int = Field(ge=0)
    size_bytes: int = Field(ge=0, description="Size of the stored original record.")


class PendingRecord(_Model):
    """One pending conversion's state in the changelog (key = request id; tombstone when finished).

    States: ``queued`` (waiting for its first submit or a retry at
    ``next_attempt_at``), ``submitting`` (a submit may be in flight: after a
    crash the new owner resubmits and counts it), ``submitted`` (DocuTray has
    ``conversion_id``; being polled).

    The record is small: the original input record (with the document) is kept
    once in ``<group>.pending-documents`` at ``document``; what results need
    without reading it back (type, file name, metadata up to 2 KiB, headers)
    is here. Records written before the split carry ``original`` inline instead.
    """

    schema_version: Literal[1] = SCHEMA_VERSION
    request_id: str
    state: PendingState
    received_at: datetime
    document_type_code: str = ""
    filename: str | None = None
    metadata: dict[str, Any] | None = None
    metadata_in_document: bool = Field(
        default=False,
        description="The metadata is too large to repeat here: read it from the document.",
    )
    headers: list[OriginalHeader] = Field(default_factory=list)
    document: DocumentRef | None = None
    original: OriginalRecord | None = Field(
        default=None, description="Records written before documents moved beside the state."
    )
    attempts: int = 0
    next_attempt_at: datetime | None = None
    last_error: str | None = None
    conversion_id: str | None = None
    submitted_at: datetime | None = None
    status_calls: int = 0
    lost_resubmits: int = 0
    content_hash: str | None = Field(
        default=None,
        description="Hash of the request's canonical content (re-sends vs id conflicts).",
    )


#: Every model with a published JSON Schema, by file stem.
PUBLISHED_MODELS: dict[str, type[BaseModel]] = {
    "document-request": DocumentRequest,
    "conversion-result": ConversionResult,
    "dead-letter": DeadLetter,
    "pending-record": PendingRecord,
}
