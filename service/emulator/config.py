"""Every knob of the DocuTray emulator, validated once by pydantic.

`EmulatorConfig` is what `create_app` takes; the CLI builds it from options and
environment variables. `KnobsPatch` is the subset that `POST /_emulator/config`
may change at runtime (chaos tests): fault rates, the rate limit and the
processing-time medians. Everything else is fixed for the life of the process.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

MIB = 1024 * 1024

RateLimitScope = Literal["all", "submit"]
"""Which calls spend the per-minute budget: every API call, or only submissions."""

RateLimitAlgorithm = Literal["sliding", "fixed"]
"""`sliding`: at most N calls in ANY 60 s span (a log of call times per key).
`fixed`: at most N calls per wall-clock minute (windows aligned to :00)."""


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
    rate_limit_scope: RateLimitScope = "all"
    rate_limit_algorithm: RateLimitAlgorithm = "sliding"
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

    `rate_limit_per_minute: null` switches the limit off.
    """

    model_config = ConfigDict(extra="forbid")

    error_rate: float | None = Field(default=None, ge=0, le=1)
    fault_500_rate: float | None = Field(default=None, ge=0, le=1)
    slow_response_rate: float | None = Field(default=None, ge=0, le=1)
    slow_response_s: float | None = Field(default=None, ge=0)
    rate_limit_per_minute: int | None = Field(default=None, gt=0)
    rate_limit_scope: RateLimitScope | None = None
    processing_median_s: float | None = Field(default=None, gt=0)
    processing_sigma: float | None = Field(default=None, ge=0)
    processing_median_s_by_type: dict[str, float] | None = None

    @field_validator(
        "error_rate",
        "fault_500_rate",
        "slow_response_rate",
        "slow_response_s",
        "rate_limit_scope",
        "processing_median_s",
        "processing_sigma",
        "processing_median_s_by_type",
    )
    @classmethod
    def _not_null(cls, value: object) -> object:
        # Only rate_limit_per_minute has a meaningful null (limit off).
        if value is None:
            raise ValueError("may not be null")
        return value
