"""Every knob of the DocuTray emulator, validated once by pydantic.

`EmulatorConfig` is what `create_app` takes; the CLI builds it from options and
environment variables. `KnobsPatch` is the subset that `POST /_emulator/config`
may change at runtime (chaos tests): fault rates, the rate limits (minute,
hour, day), the monthly quota, the processing-time medians and every webhook
knob. Everything else is fixed for the life of the process.
"""

from __future__ import annotations

from typing import Literal

from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, SecretStr, field_validator

MIB = 1024 * 1024

RateLimitScope = Literal["all", "submit"]
"""Which calls spend the per-minute budget: every API call, or only submissions."""

RateLimitAlgorithm = Literal["sliding", "fixed"]
"""`sliding`: at most N calls in ANY span of the window (60 s, 1 h, 24 h; a log of
call times per key). `fixed`: at most N calls per wall-clock window (aligned to
:00 for minutes and hours, to midnight UTC for days)."""

WebhookEvent = Literal["CONVERSION_STARTED", "CONVERSION_COMPLETED", "CONVERSION_FAILED"]
WEBHOOK_EVENTS: tuple[WebhookEvent, ...] = (
    "CONVERSION_STARTED",
    "CONVERSION_COMPLETED",
    "CONVERSION_FAILED",
)


class EmulatorConfig(BaseModel):
    """Configuration of one emulator process; immutable, replaced as a whole on patch."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    api_keys: list[SecretStr] = Field(
        default_factory=list,
        description="Accepted bearer keys; any other key gets 401.",
    )
    max_upload_bytes: int = Field(
        default=100 * MIB, gt=0, description="Largest accepted document (decoded bytes)."
    )
    url_download_timeout_s: float = Field(
        default=30.0, gt=0, description="Give up downloading an image_url after this long."
    )
    rate_limit_per_minute: int | None = Field(
        default=None, gt=0, description="Calls per API key per minute; None disables the limit."
    )
    rate_limit_per_hour: int | None = Field(
        default=None, gt=0, description="Calls per API key per hour; None disables the limit."
    )
    rate_limit_per_day: int | None = Field(
        default=None, gt=0, description="Calls per API key per day; None disables the limit."
    )
    rate_limit_hour_window_s: float = Field(
        default=3600.0,
        gt=0,
        description="Length of the 'hour' window (tests shorten it so resetTime comes soon).",
    )
    rate_limit_day_window_s: float = Field(
        default=86400.0,
        gt=0,
        description="Length of the 'day' window (tests shorten it so resetTime comes soon).",
    )
    rate_limit_scope: RateLimitScope = "all"
    rate_limit_algorithm: RateLimitAlgorithm = "sliding"
    monthly_quota: int | None = Field(
        default=None,
        ge=0,
        description="Conversions accepted per API key per calendar month (UTC) before "
        "submissions get 402; None means no quota.",
    )
    monthly_quota_period_s: float | None = Field(
        default=None,
        gt=0,
        description="Test-only: count the quota per fixed period of this many seconds "
        "(epoch-aligned; resetDate its end) instead of per calendar month.",
    )
    webhook_urls: list[str] = Field(
        default_factory=list,
        description="Where every conversion event is POSTed (DocuTray: one endpoint per "
        "organisation; here any number).",
    )
    webhook_events: list[WebhookEvent] = Field(
        default_factory=lambda: list(WEBHOOK_EVENTS),
        description="Which events are sent.",
    )
    webhook_drop_rate: float = Field(
        default=0.0, ge=0, le=1, description="Share of events never delivered (lost webhooks)."
    )
    webhook_duplicate_rate: float = Field(
        default=0.0, ge=0, le=1, description="Share of events delivered twice."
    )
    webhook_delay_s: float = Field(
        default=0.0, ge=0, description="Seconds between an event and its first delivery."
    )
    webhook_max_attempts: int = Field(
        default=3, ge=1, le=20, description="Attempts per delivery (a non-2xx answer retries)."
    )
    webhook_retry_delay_s: float = Field(
        default=1.0, ge=0, description="Wait before the first retry; doubles each retry."
    )
    webhook_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="How long a receiver may take to answer (DocuTray: 30 s).",
    )
    processing_median_s: float = Field(
        default=2.0, gt=0, description="Median of the log-normal processing time."
    )
    processing_sigma: float = Field(
        default=0.5, ge=0, description="Log-normal shape (sigma of ln(duration))."
    )
    processing_median_s_by_type: dict[str, float] = Field(
        default_factory=dict, description="Per document_type_code override of the median."
    )
    enqueued_fraction: float = Field(
        default=0.2,
        ge=0,
        le=1,
        description="Share of a conversion's duration spent ENQUEUED before PROCESSING.",
    )
    processing_give_up_s: float = Field(
        default=3600.0,
        gt=0,
        description="Conversions drawn longer than this end in ERROR at this time "
        "(the real service gives up after 60 minutes).",
    )
    error_rate: float = Field(
        default=0.0, ge=0, le=1, description="Share of conversions ending in ERROR."
    )
    fault_500_rate: float = Field(
        default=0.0, ge=0, le=1, description="Share of API calls answered with an injected 500."
    )
    slow_response_rate: float = Field(
        default=0.0, ge=0, le=1, description="Share of API calls delayed before answering."
    )
    slow_response_s: float = Field(default=5.0, ge=0, description="Delay applied to a slow call.")
    seed: int = Field(
        default=0,
        description="Seeds faults, outcomes, durations and extracted data (reproducible runs).",
    )
    finished_ttl_s: float = Field(
        default=3600.0,
        gt=0,
        description="A finished conversion is forgotten (status 404) this long after it ends.",
    )
    public_base_url: str | None = Field(
        default=None,
        description="Base of status_url; None uses the URL the request arrived on.",
    )

    @field_validator("processing_median_s_by_type")
    @classmethod
    def _positive_medians(cls, value: dict[str, float]) -> dict[str, float]:
        for code, median_s in value.items():
            if median_s <= 0:
                raise ValueError(f"median for {code!r} must be > 0")
        return value

    @field_validator("public_base_url")
    @classmethod
    def _strip_slash(cls, value: str | None) -> str | None:
        return value.rstrip("/") if value else None

    @field_validator("webhook_urls")
    @classmethod
    def _http_urls(cls, value: list[str]) -> list[str]:
        return _check_webhook_urls(value)

    def median_for(self, document_type_code: str) -> float:
        """Median processing time for a document type (its override, else the default)."""
        return self.processing_median_s_by_type.get(document_type_code, self.processing_median_s)

    def knobs(self) -> dict[str, object]:
        """The runtime-patchable knobs and their current values (never the API keys)."""
        return self.model_dump(include=set(KnobsPatch.model_fields))

    def patched(self, patch: KnobsPatch) -> EmulatorConfig:
        """A new config with the fields the patch explicitly sets; validated like the original."""
        values = self.model_dump()
        values["api_keys"] = self.api_keys
        values.update(patch.model_dump(exclude_unset=True))
        return EmulatorConfig.model_validate(values)


class KnobsPatch(BaseModel):
    """Body of `POST /_emulator/config`: only the fields sent are changed.

    `null` switches a rate limit (`rate_limit_per_minute`, `_per_hour`,
    `_per_day`) or the `monthly_quota` off; `webhook_urls: []` stops webhooks.
    """

    model_config = ConfigDict(extra="forbid")

    error_rate: float | None = Field(default=None, ge=0, le=1)
    fault_500_rate: float | None = Field(default=None, ge=0, le=1)
    slow_response_rate: float | None = Field(default=None, ge=0, le=1)
    slow_response_s: float | None = Field(default=None, ge=0)
    rate_limit_per_minute: int | None = Field(default=None, gt=0)
    rate_limit_per_hour: int | None = Field(default=None, gt=0)
    rate_limit_per_day: int | None = Field(default=None, gt=0)
    rate_limit_hour_window_s: float | None = Field(default=None, gt=0)
    rate_limit_day_window_s: float | None = Field(default=None, gt=0)
    monthly_quota: int | None = Field(default=None, ge=0)
    monthly_quota_period_s: float | None = Field(default=None, gt=0)
    rate_limit_scope: RateLimitScope | None = None
    processing_median_s: float | None = Field(default=None, gt=0)
    processing_sigma: float | None = Field(default=None, ge=0)
    processing_median_s_by_type: dict[str, float] | None = None
    webhook_urls: list[str] | None = None
    webhook_events: list[WebhookEvent] | None = None
    webhook_drop_rate: float | None = Field(default=None, ge=0, le=1)
    webhook_duplicate_rate: float | None = Field(default=None, ge=0, le=1)
    webhook_delay_s: float | None = Field(default=None, ge=0)
    webhook_max_attempts: int | None = Field(default=None, ge=1, le=20)
    webhook_retry_delay_s: float | None = Field(default=None, ge=0)
    webhook_timeout_s: float | None = Field(default=None, gt=0)

    @field_validator(
        "error_rate",
        "fault_500_rate",
        "slow_response_rate",
        "slow_response_s",
        "rate_limit_scope",
        "rate_limit_hour_window_s",
        "rate_limit_day_window_s",
        "processing_median_s",
        "processing_sigma",
        "processing_median_s_by_type",
        "webhook_urls",
        "webhook_events",
        "webhook_drop_rate",
        "webhook_duplicate_rate",
        "webhook_delay_s",
        "webhook_max_attempts",
        "webhook_retry_delay_s",
        "webhook_timeout_s",
    )
    @classmethod
    def _not_null(cls, value: object) -> object:
        # Only the rate limits and the quota (and its period) have a meaningful null (off).
        if value is None:
            raise ValueError("may not be null")
        return value

    @field_validator("webhook_urls")
    @classmethod
    def _http_urls(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else _check_webhook_urls(value)


def _check_webhook_urls(urls: list[str]) -> list[str]:
    """Every URL must be absolute http(s); returned as given (order kept, duplicates dropped)."""
    seen: list[str] = []
    for url in urls:
        parsed = AnyHttpUrl(url)
        if not parsed.host:
            raise ValueError(f"webhook URL without a host: {url!r}")
        if url not in seen:
            seen.append(url)
    return seen
