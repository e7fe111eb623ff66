"""The emulator's ASGI app: DocuTray's async conversion API, as the contract says.

Routes (bodies and statuses per docs/docutray-api.md):

    GET  /healthz                                 no auth, {"status": "ok"}
    POST /api/convert-async                       multipart, base64 JSON or URL JSON
    GET  /api/convert-async/status/{id}
    GET  /api/document-types?search=&page=&limit=
    GET  /api/document-types/{id}
    GET  /api/usage[?year=&month=]                never 429 or 402, spends no budget

Emulator-only routes (no auth; never present on the real service):

    GET  /_emulator/stats[?timestamps=0]          counters, see EmulatorStats.snapshot
    GET  /_emulator/config                        current runtime knobs
    POST /_emulator/config                        patch knobs (KnobsPatch body)
    POST /_emulator/forget                        drop every conversion (status -> 404)
    POST /_emulator/reset-stats                   zero the counters

Every API call goes through the same gate, in this order: expire finished
conversions, authenticate (401), spend rate-limit budget in the minute, hour
and day windows (429 naming the spent window), apply an injected slow answer.
A submit then meets the monthly quota (402, before its body is read, and
again at the instant of acceptance so concurrent submits cannot overshoot
it). An injected 500 on submit is decided at the gate but answered after the
body is read, so the client always sees a clean answer and no conversion is
created. `/api/usage` passes authentication and injected faults only.

Accepted conversions feed the usage ledger (`usage.py`) and, when webhook
URLs are configured, the webhook dispatcher (`webhooks.py`).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
import secrets
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Any, Final, Literal

import structlog
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from service.emulator import doctypes
from service.emulator.config import EmulatorConfig, KnobsPatch
from service.emulator.conversions import (
    Conversion,
    ConversionStore,
    draw_plan,
    new_conversion_id,
    plan_rng,
)
from service.emulator.faults import CallFaults, FaultInjector
from service.emulator.formats import (
    EXTENSION_BY_MIME,
    SUPPORTED_MIME_TYPES,
    Base64Error,
    DocumentTooLarge,
    MimeType,
    decode_base64_document,
    size_label,
    sniff_mime_type,
)
from service.emulator.limits import PlanRateLimiter, rate_limited_body
from service.emulator.stats import EmulatorStats
from service.emulator.uploads import (
    BoundedBody,
    MalformedUpload,
    MultipartImageReader,
    UrlDownloadTimeout,
    UrlFetcher,
    UrlNotReachable,
    consume_body,
    json_body_limit,
)
from service.emulator.usage import UsageLedger, month_of, quota_exceeded_body
from service.emulator.webhooks import WebhookDispatcher

log = structlog.get_logger(__name__)

CallKind = Literal["submit", "status", "catalogue", "usage"]

_FAULT_MESSAGES: Final[dict[CallKind, str]] = {
    "submit": "Internal server error: Failed to start conversion",
    "status": "Internal server error: Failed to retrieve conversion status",
    "catalogue": "Internal server error",
    "usage": "Internal server error",
}
_PDF_PAGES_MAX: Final = 3
"""A PDF counts 1..3 pages in usage (drawn from its plan); an image counts 1."""
_UNSUPPORTED_FORMAT: Final = "Unsupported file format. Accepted formats: " + ", ".join(
    SUPPORTED_MIME_TYPES
)


def _fingerprint(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()[:16]


def _validation_error(*errors: str) -> dict[str, Any]:
    return {"message": "Validation error", "errors": list(errors)}


class _Rejected(Exception):
    """Carries a finished error response out of the submit pipeline."""

    def __init__(self, status_code: int, body: Mapping[str, Any]) -> None:
        super().__init__(status_code)
        self.status_code = status_code
        self.body = body


@dataclass(frozen=True, slots=True)
class _Document:
    """What a submission's document boils down to once read and checked."""

    filename: str | None
    mime_type: MimeType
    size_bytes: int


@dataclass(frozen=True, slots=True)
class _Submission:
    document_type_code: str
    metadata: dict[str, Any] | None
    document: _Document


class EmulatorState:
    """All mutable state of one emulator process; the routes are thin around it."""

    def __init__(self, config: EmulatorConfig) -> None:
        self.config = config
        self.limiter = PlanRateLimiter(
            per_minute=config.rate_limit_per_minute,
            per_hour=config.rate_limit_per_hour,
            per_day=config.rate_limit_per_day,
            algorithm=config.rate_limit_algorithm,
            hour_window_s=config.rate_limit_hour_window_s,
            day_window_s=config.rate_limit_day_window_s,
        )
        self.faults = FaultInjector(seed=config.seed)
        self.store = ConversionStore()
        self.stats = EmulatorStats()
        self.ledger = UsageLedger()
        self.webhooks = WebhookDispatcher(
            config=lambda: self.config,
            stats=lambda: self.stats,
            is_live=lambda c: self.store.get(c.conversion_id) is c,
        )
        self.sequence = 0
        self._owners = {_fingerprint(k.get_secret_value()) for k in config.api_keys}
        self._request_prefix = secrets.token_hex(4)
        self._request_counter = 0
        self.fetcher: UrlFetcher | None = None

    def apply(self, patch: KnobsPatch) -> None:
        """Replace the runtime knobs; calls counted while a limit was on still count."""
        self.config = self.config.patched(patch)
        self.limiter.set_limits(
            per_minute=self.config.rate_limit_per_minute,
            per_hour=self.config.rate_limit_per_hour,
            per_day=self.config.rate_limit_per_day,
            hour_window_s=self.config.rate_limit_hour_window_s,
            day_window_s=self.config.rate_limit_day_window_s,
        )

    def owner_of(self, authorization: str | None) -> str | None:
        """The key fingerprint for a valid `Bearer <key>` header, else None."""
        if not authorization:
            return None
        scheme, _, key = authorization.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            return None
        owner = _fingerprint(key.strip())
        return owner if owner in self._owners else None

    def next_request_id(self) -> str:
        """A unique `X-Request-ID` for a response."""
        self._request_counter += 1
        return f"req_{self._request_prefix}{self._request_counter:08x}"

    def drain_limit_bytes(self) -> int:
        """How much of a rejected upload is read and discarded before answering."""
        return json_body_limit(self.config.max_upload_bytes)


def _state(request: Request) -> EmulatorState:
    state: EmulatorState = request.app.state.emulator
    return state


def _json(
    state: EmulatorState,
    body: Mapping[str, Any],
    status_code: int,
    *,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    all_headers = {"X-Request-ID": state.next_request_id()}
    if headers:
        all_headers.update(headers)
    return JSONResponse(dict(body), status_code=status_code, headers=all_headers)


async def _gate(request: Request, kind: CallKind) -> tuple[str, CallFaults] | JSONResponse:
    """Authenticate, spend budget and apply slowness; an error response or (owner, faults)."""
    state = _state(request)
    config = state.config
    now_s = time.time()
    state.store.expire(now_s)
    state.ledger.settle(now_s)
    owner = state.owner_of(request.headers.get("authorization"))
    if owner is None:
        state.stats.auth_failures += 1
        return _json(state, {"error": "Invalid API key"}, 401)
    if kind != "usage" and (config.rate_limit_scope == "all" or kind == "submit"):
        decision = state.limiter.acquire(owner, now_s=now_s)
        if not decision.allowed:
            state.stats.rate_limited += 1
            state.stats.rate_limited_by_window[decision.limit_type] += 1
            body, retry_after_s = rate_limited_body(decision, now_s=now_s)
            return _json(state, body, 429, headers={"Retry-After": str(retry_after_s)})
        state.stats.record_counted_call(time.monotonic())
    faults = state.faults.draw(
        fault_500_rate=config.fault_500_rate,
        slow_response_rate=config.slow_response_rate,
        slow_response_s=config.slow_response_s,
    )
    if faults.delay_s > 0:
        state.stats.slow_responses += 1
        await asyncio.sleep(faults.delay_s)
    return owner, faults


def _fault(state: EmulatorState, kind: CallKind) -> JSONResponse:
    state.stats.faults_injected += 1
    log.debug("fault_injected", kind=kind)
    return _json(state, {"message": _FAULT_MESSAGES[kind]}, 500)


# --- API routes --------------------------------------------------------------


async def healthz(request: Request) -> Response:
    """Liveness for scripts and fixtures; no auth, no budget."""
    return JSONResponse({"status": "ok"})


async def submit(request: Request) -> Response:
    """POST /api/convert-async."""
    state = _state(request)
    response, request_id = await _submit(request, state)
    state.stats.record_submission(response.status_code, request_id=request_id)
    return response


async def _submit(request: Request, state: EmulatorState) -> tuple[Response, str | None]:
    gate = await _gate(request, "submit")
    if isinstance(gate, JSONResponse):
        await _drain(request, state)
        return gate, None
    owner, faults = gate
    quota = _quota_exceeded(state, owner)
    if quota is not None:
        await _drain(request, state)
        return quota, None
    try:
        submission = await _read_submission(request, state)
    except _Rejected as rejected:
        return _json(state, rejected.body, rejected.status_code), None
    except ClientDisconnect:
        return Response(status_code=499), None
    if faults.fail_500:
        return _fault(state, "submit"), None
    request_id = _metadata_request_id(submission.metadata)
    return _accept(request, state, owner, submission, request_id=request_id), request_id


def _quota_exceeded(state: EmulatorState, owner: str) -> JSONResponse | None:
    """The 402 answer when `owner`'s monthly quota is spent, else None."""
    config = state.config
    decision = state.ledger.check_quota(
        owner, config.monthly_quota, now_s=time.time(), period_s=config.monthly_quota_period_s
    )
    if decision.allowed:
        return None
    state.stats.quota_exceeded += 1
    return _json(state, quota_exceeded_body(decision), 402)


def _accept(
    request: Request,
    state: EmulatorState,
    owner: str,
    submission: _Submission,
    *,
    request_id: str | None,
) -> Response:
    # No await from here on: the quota check and the acceptance are one step.
    quota = _quota_exceeded(state, owner)
    if quota is not None:
        return quota
    config = state.config
    now_s = time.time()
    state.sequence += 1
    code = submission.document_type_code
    plan = draw_plan(
        plan_rng(config.seed, state.sequence),
        median_s=config.median_for(code),
        sigma=config.processing_sigma,
        error_rate=config.error_rate,
        enqueued_fraction=config.enqueued_fraction,
        give_up_s=config.processing_give_up_s,
    )
    conversion_id = new_conversion_id(now_s=now_s, counter=state.sequence)
    document = submission.document
    filename = document.filename or f"document.{EXTENSION_BY_MIME[document.mime_type]}"
    conversion = Conversion(
        conversion_id=conversion_id,
        sequence=state.sequence,
        owner=owner,
        document_type_code=code,
        original_filename=filename,
        submitted_at_s=now_s,
        plan=plan,
        request_id=request_id,
    )
    state.store.add(conversion, ttl_s=config.finished_ttl_s)
    pages = 1 + plan.data_seed % _PDF_PAGES_MAX if document.mime_type == "application/pdf" else 1
    state.ledger.record_accepted(
        owner,
        now_s=now_s,
        succeeds_at_s=conversion.ends_at_s if plan.outcome == "SUCCESS" else None,
        pages=pages,
        period_s=config.monthly_quota_period_s,
    )
    state.webhooks.schedule(conversion, metadata=submission.metadata, now_s=now_s)
    base = config.public_base_url or str(request.base_url).rstrip("/")
    log.debug(
        "conversion_submitted",
        conversion_id=conversion_id,
        document_type_code=code,
        size_bytes=document.size_bytes,
        outcome=plan.outcome,
        duration_s=round(plan.duration_s, 3),
    )
    return _json(
        state,
        {
            "conversion_id": conversion_id,
            "status_url": f"{base}/api/convert-async/status/{conversion_id}",
            "status": "ENQUEUED",
        },
        202,
    )


def _metadata_request_id(metadata: dict[str, Any] | None) -> str | None:
    if not metadata:
        return None
    value = metadata.get("request_id")
    if isinstance(value, str | int) and not isinstance(value, bool):
        return str(value)
    return None


async def _drain(request: Request, state: EmulatorState) -> None:
    """Read and discard an unread body so the client gets our answer, not a reset."""
    with suppress(ClientDisconnect):
        await consume_body(
            request.stream(), lambda _chunk: None, drain_limit_bytes=state.drain_limit_bytes()
        )


async def _read_submission(request: Request, state: EmulatorState) -> _Submission:
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type == "multipart/form-data":
        return await _read_multipart(request, state)
    if media_type == "application/json":
        return await _read_json(request, state)
    await _drain(request, state)
    raise _Rejected(
        415, {"message": "Unsupported Content-Type. Use multipart/form-data or application/json."}
    )


def _too_large(max_bytes: int) -> _Rejected:
    return _Rejected(
        413, {"message": f"File exceeds maximum allowed size ({size_label(max_bytes)})"}
    )


def _check_type_code(value: object, errors: list[str]) -> str:
    if not isinstance(value, str) or not value.strip():
        errors.append("document_type_code is required")
        return ""
    code = value.strip()
    if doctypes.find_by_code(code) is None:
        errors.append(
            f"Unknown document type: {code}. Known types: {', '.join(doctypes.known_codes())}"
        )
    return code


def _check_document(head: bytes, size_bytes: int, filename: str | None) -> _Document:
    if size_bytes == 0:
        raise _Rejected(400, _validation_error("image is empty"))
    mime_type = sniff_mime_type(head)
    if mime_type is None:
        raise _Rejected(400, _validation_error(_UNSUPPORTED_FORMAT))
    return _Document(filename=filename, mime_type=mime_type, size_bytes=size_bytes)


async def _read_multipart(request: Request, state: EmulatorState) -> _Submission:
    max_bytes = state.config.max_upload_bytes
    try:
        reader = MultipartImageReader(
            request.headers.get("content-type", ""), max_image_bytes=max_bytes
        )
    except MalformedUpload as exc:
        await _drain(request, state)
        raise _Rejected(400, _validation_error(str(exc))) from exc
    try:
        await consume_body(
            request.stream(), reader.feed, drain_limit_bytes=state.drain_limit_bytes()
        )
        reader.finish()
    except DocumentTooLarge as exc:
        raise _too_large(exc.max_bytes) from exc
    except MalformedUpload as exc:
        raise _Rejected(400, _validation_error(str(exc))) from exc

    errors: list[str] = []
    code = _check_type_code(reader.fields.get("document_type_code"), errors)
    metadata: dict[str, Any] | None = None
    raw_metadata = reader.fields.get("document_metadata")
    if raw_metadata:
        try:
            parsed = json.loads(raw_metadata)
        except json.JSONDecodeError:
            parsed = None
        if isinstance(parsed, dict):
            metadata = parsed
        else:
            errors.append("document_metadata must be a JSON object encoded as a string")
    if reader.image is None:
        errors.append("image is required: send the document as the file part 'image'")
    if errors:
        raise _Rejected(400, _validation_error(*errors))
    assert reader.image is not None
    document = _check_document(reader.image.head, reader.image.size_bytes, reader.image.filename)
    return _Submission(document_type_code=code, metadata=metadata, document=document)


async def _read_json(request: Request, state: EmulatorState) -> _Submission:
    config = state.config
    body = BoundedBody(
        max_bytes=json_body_limit(config.max_upload_bytes),
        document_max_bytes=config.max_upload_bytes,
    )
    try:
        await consume_body(request.stream(), body.feed, drain_limit_bytes=state.drain_limit_bytes())
    except DocumentTooLarge as exc:
        raise _too_large(exc.max_bytes) from exc
    try:
        payload = json.loads(body.value())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _Rejected(400, _validation_error("Malformed JSON body")) from exc
    if not isinstance(payload, dict):
        raise _Rejected(400, _validation_error("Request body must be a JSON object"))

    errors: list[str] = []
    code = _check_type_code(payload.get("document_type_code"), errors)
    metadata = payload.get("document_metadata")
    if metadata is not None and not isinstance(metadata, dict):
        errors.append("document_metadata must be a JSON object")
        metadata = None
    content_type = payload.get("image_content_type")
    if content_type is not None and not isinstance(content_type, str):
        errors.append("image_content_type must be a string")
    image_base64 = payload.get("image_base64")
    image_url = payload.get("image_url")
    if image_base64 is None and image_url is None:
        errors.append("One of image (multipart), image_base64 or image_url is required")
    elif image_base64 is not None and image_url is not None:
        errors.append("Send only one of image_base64 or image_url")
    elif image_base64 is not None and (not isinstance(image_base64, str) or not image_base64):
        errors.append("image_base64 must be a non-empty string")
    elif image_url is not None and not _is_http_url(image_url):
        errors.append("image_url must be an http or https URL")
    if errors:
        raise _Rejected(400, _validation_error(*errors))

    if isinstance(image_base64, str):
        try:
            decoded = decode_base64_document(image_base64, max_bytes=config.max_upload_bytes)
        except Base64Error as exc:
            raise _Rejected(400, _validation_error(str(exc))) from exc
        except DocumentTooLarge as exc:
            raise _too_large(exc.max_bytes) from exc
        document = _check_document(decoded.head, decoded.size_bytes, None)
    else:
        document = await _download(state, str(image_url))
    return _Submission(document_type_code=code, metadata=metadata, document=document)


def _is_http_url(value: object) -> bool:
    if not isinstance(value, str):
        return False
    lowered = value.lower()
    return lowered.startswith(("http://", "https://")) and len(value) > len("https://")


async def _download(state: EmulatorState, url: str) -> _Document:
    config = state.config
    assert state.fetcher is not None, "lifespan not started"
    try:
        fetched = await state.fetcher.fetch(
            url, timeout_s=config.url_download_timeout_s, max_bytes=config.max_upload_bytes
        )
    except UrlNotReachable as exc:
        raise _Rejected(404, {"message": f"Error accessing URL: {exc.reason}"}) from exc
    except UrlDownloadTimeout as exc:
        timeout_ms = math.ceil(config.url_download_timeout_s * 1000)
        raise _Rejected(408, {"message": f"URL download timeout ({timeout_ms}ms)"}) from exc
    except DocumentTooLarge as exc:
        raise _too_large(exc.max_bytes) from exc
    return _check_document(fetched.head, fetched.size_bytes, fetched.filename)


async def status(request: Request) -> Response:
    """GET /api/convert-async/status/{conversion_id}."""
    state = _state(request)
    response = await _status(request, state)
    state.stats.record_status_call(response.status_code)
    return response


async def _status(request: Request, state: EmulatorState) -> Response:
    gate = await _gate(request, "status")
    if isinstance(gate, JSONResponse):
        return gate
    owner, faults = gate
    if faults.fail_500:
        return _fault(state, "status")
    conversion = state.store.get(request.path_params["conversion_id"])
    if conversion is None:
        return _json(state, {"error": "Conversion not found"}, 404)
    if conversion.owner != owner:
        return _json(state, {"error": "Access denied to this conversion"}, 403)
    return _json(state, conversion.status_body(time.time()), 200)


def _positive_int(raw: str | None, *, name: str, default: int, maximum: int) -> int:
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if not 1 <= value <= maximum:
        raise _Rejected(400, _validation_error(f"{name} must be an integer from 1 to {maximum}"))
    return value


async def list_document_types(request: Request) -> Response:
    """GET /api/document-types?search=&page=1&limit=20."""
    state = _state(request)
    state.stats.document_type_calls += 1
    gate = await _gate(request, "catalogue")
    if isinstance(gate, JSONResponse):
        return gate
    if gate[1].fail_500:
        return _fault(state, "catalogue")
    params = request.query_params
    try:
        page = _positive_int(params.get("page"), name="page", default=1, maximum=1_000_000)
        limit = _positive_int(params.get("limit"), name="limit", default=20, maximum=100)
    except _Rejected as rejected:
        return _json(state, rejected.body, rejected.status_code)
    items, total = doctypes.search(params.get("search"), page=page, limit=limit)
    body = {
        "data": [t.summary() for t in items],
        "pagination": {"total": total, "page": page, "limit": limit},
    }
    return _json(state, body, 200)


async def get_document_type(request: Request) -> Response:
    """GET /api/document-types/{type_id}: one type with its `jsonSchema`."""
    state = _state(request)
    state.stats.document_type_calls += 1
    gate = await _gate(request, "catalogue")
    if isinstance(gate, JSONResponse):
        return gate
    if gate[1].fail_500:
        return _fault(state, "catalogue")
    found = doctypes.find_by_id(request.path_params["type_id"])
    if found is None:
        return _json(state, {"error": "Document type not found"}, 404)
    return _json(state, found.detail(), 200)


async def usage(request: Request) -> Response:
    """GET /api/usage?year=&month=: the key's successful conversions and pages in a month."""
    state = _state(request)
    state.stats.usage_calls += 1
    gate = await _gate(request, "usage")
    if isinstance(gate, JSONResponse):
        return gate
    owner, faults = gate
    if faults.fail_500:
        return _fault(state, "usage")
    now_s = time.time()
    params = request.query_params
    raw_year, raw_month = params.get("year"), params.get("month")
    if raw_year is None and raw_month is None:
        month = month_of(now_s)
    else:
        try:
            month = (
                _positive_int(raw_year, name="year", default=0, maximum=9999),
                _positive_int(raw_month, name="month", default=0, maximum=12),
            )
        except _Rejected as rejected:
            return _json(state, rejected.body, rejected.status_code)
        if 0 in month:
            return _json(state, _validation_error("year and month must be given together"), 400)
    return _json(state, state.ledger.usage(owner, month, now_s=now_s), 200)


# --- emulator-only routes ----------------------------------------------------


async def get_stats(request: Request) -> Response:
    """GET /_emulator/stats: counters; `?timestamps=0` omits the call-time list."""
    state = _state(request)
    state.store.expire(time.time())
    include = request.query_params.get("timestamps", "1").lower() not in ("0", "false", "no")
    return JSONResponse(
        state.stats.snapshot(conversions_live=len(state.store), include_timestamps=include)
    )


async def get_config(request: Request) -> Response:
    """GET /_emulator/config: the runtime-patchable knobs."""
    return JSONResponse(_state(request).config.knobs())


async def patch_config(request: Request) -> Response:
    """POST /_emulator/config: change fault knobs at runtime (chaos tests)."""
    state = _state(request)
    try:
        patch = KnobsPatch.model_validate_json(await request.body())
        state.apply(patch)
    except ValidationError as exc:
        errors = [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]
        return JSONResponse(_validation_error(*errors), status_code=400)
    log.info("emulator_config_patched", **patch.model_dump(exclude_unset=True))
    return JSONResponse(state.config.knobs())


async def forget(request: Request) -> Response:
    """POST /_emulator/forget: drop every conversion, like a restart that lost state."""
    dropped = _state(request).store.clear()
    log.info("emulator_conversions_forgotten", dropped=dropped)
    return JSONResponse({"forgotten": dropped})


async def reset_stats(request: Request) -> Response:
    """POST /_emulator/reset-stats: zero every counter."""
    _state(request).stats = EmulatorStats()
    return JSONResponse({"status": "ok"})


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    body = {"error": exc.detail if isinstance(exc.detail, str) else "Error"}
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)


def create_app(config: EmulatorConfig) -> Starlette:
    """The emulator as an ASGI app; `app.state.emulator` holds its `EmulatorState`.

    The image_url downloader's connection pool opens and closes with the
    app's lifespan, so serve it with lifespan enabled (uvicorn's default).
    """
    emulator = EmulatorState(config)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        emulator.fetcher = UrlFetcher()
        await emulator.webhooks.start()
        log.info(
            "emulator_started",
            pid=os.getpid(),
            seed=config.seed,
            api_keys=len(config.api_keys),
            **config.knobs(),
        )
        try:
            yield
        finally:
            await emulator.webhooks.aclose()
            await emulator.fetcher.aclose()
            emulator.fetcher = None

    routes = [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/api/convert-async", submit, methods=["POST"]),
        Route("/api/convert-async/status/{conversion_id}", status, methods=["GET"]),
        Route("/api/document-types", list_document_types, methods=["GET"]),
        Route("/api/document-types/{type_id}", get_document_type, methods=["GET"]),
        Route("/api/usage", usage, methods=["GET"]),
        Route("/_emulator/stats", get_stats, methods=["GET"]),
        Route("/_emulator/config", get_config, methods=["GET"]),
        Route("/_emulator/config", patch_config, methods=["POST"]),
        Route("/_emulator/forget", forget, methods=["POST"]),
        Route("/_emulator/reset-stats", reset_stats, methods=["POST"]),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={HTTPException: _http_error},
    )
    app.state.emulator = emulator
    return app
