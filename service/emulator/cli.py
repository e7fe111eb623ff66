"""`docutray-bridge emulator` / `python -m service.emulator`: serve the emulator.

Every knob of `EmulatorConfig` is an option, each also readable from an
`EMULATOR_*` environment variable (prefer `EMULATOR_API_KEYS` to `--api-key`
so keys stay out of the process list). One line
`emulator listening on http://HOST:PORT` goes to stdout once the socket is
bound; `--port 0` binds a free port and prints the real one.
"""

from __future__ import annotations

import socket
import sys
from typing import Any

import click
import structlog
import uvicorn
from pydantic import ValidationError

from service.emulator.app import create_app
from service.emulator.config import WEBHOOK_EVENTS, EmulatorConfig
from service.logging import configure_logging, register_secrets

_DEFAULTS = EmulatorConfig()


def _parse_medians(
    ctx: click.Context, param: click.Parameter, values: tuple[str, ...]
) -> dict[str, float]:
    medians: dict[str, float] = {}
    for item in values:
        code, sep, seconds = item.partition("=")
        try:
            medians[code.strip()] = float(seconds)
        except ValueError:
            sep = ""
        if not sep or not code.strip():
            raise click.BadParameter(f"expected TYPE=SECONDS, got {item!r}", ctx, param)
    return medians


def _configure_logging(level: str, api_keys: tuple[str, ...]) -> None:
    """The service's logging to stderr, unless the host CLI configured it already.

    The API keys are registered as secrets either way, so no log line can carry one.
    """
    register_secrets(api_keys)
    if not structlog.is_configured():
        configure_logging(level=level)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto must be IPPROTO_TCP (not 0): asyncio sets TCP_NODELAY on accepted
    # sockets only then; without it every answer waits ~40 ms on delayed ACKs.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise click.ClickException(f"cannot bind {host}:{port}: {exc}") from exc
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


@click.command("emulator")
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    envvar="EMULATOR_HOST",
    help="Interface to listen on.",
)
@click.option(
    "--port",
    default=8089,
    show_default=True,
    type=click.IntRange(0, 65535),
    envvar="EMULATOR_PORT",
    help="TCP port; 0 picks a free port (printed on start).",
)
@click.option(
    "--api-key",
    "api_keys",
    multiple=True,
    envvar="EMULATOR_API_KEYS",
    help="Accepted API key (repeatable). EMULATOR_API_KEYS takes a "
    "whitespace-separated list. Any other key gets 401.",
)
@click.option(
    "--max-upload-bytes",
    type=click.IntRange(min=1),
    default=_DEFAULTS.max_upload_bytes,
    show_default=True,
    envvar="EMULATOR_MAX_UPLOAD_BYTES",
    help="Largest accepted document in bytes (decoded); larger gets 413.",
)
@click.option(
    "--url-download-timeout-s",
    type=click.FloatRange(min=0, min_open=True),
    default=_DEFAULTS.url_download_timeout_s,
    show_default=True,
    envvar="EMULATOR_URL_DOWNLOAD_TIMEOUT_S",
    help="Seconds to download an image_url before answering 408.",
)
@click.option(
    "--rate-limit-per-minute",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    envvar="EMULATOR_RATE_LIMIT_PER_MINUTE",
    help="Calls per API key per minute before 429; 0 disables the limit.",
)
@click.option(
    "--rate-limit-per-hour",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    envvar="EMULATOR_RATE_LIMIT_PER_HOUR",
    help="Calls per API key per hour before 429 with limitType 'hour'; 0 disables it.",
)
@click.option(
    "--rate-limit-per-day",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    envvar="EMULATOR_RATE_LIMIT_PER_DAY",
    help="Calls per API key per day (UTC) before 429 with limitType 'day'; 0 disables it.",
)
@click.option(
    "--rate-limit-hour-window-s",
    type=click.FloatRange(min=0, min_open=True),
    default=_DEFAULTS.rate_limit_hour_window_s,
    show_default=True,
    envvar="EMULATOR_RATE_LIMIT_HOUR_WINDOW_S",
    help="Length of the 'hour' window in seconds (shorten it in tests so resetTime comes soon).",
)
@click.option(
    "--rate-limit-day-window-s",
    type=click.FloatRange(min=0, min_open=True),
    default=_DEFAULTS.rate_limit_day_window_s,
    show_default=True,
    envvar="EMULATOR_RATE_LIMIT_DAY_WINDOW_S",
    help="Length of the 'day' window in seconds (shorten it in tests so resetTime comes soon).",
)
@click.option(
    "--rate-limit-scope",
    type=click.Choice(["all", "submit"]),
    default=_DEFAULTS.rate_limit_scope,
    show_default=True,
    envvar="EMULATOR_RATE_LIMIT_SCOPE",
    help="Which calls spend the budget: every API call, or submissions only.",
)
@click.option(
    "--rate-limit-algorithm",
    type=click.Choice(["sliding", "fixed"]),
    default=_DEFAULTS.rate_limit_algorithm,
    show_default=True,
    envvar="EMULATOR_RATE_LIMIT_ALGORITHM",
    help="sliding: at most N calls in any 60 s; fixed: N per wall-clock minute.",
)
@click.option(
    "--monthly-quota",
    type=click.IntRange(min=0),
    default=None,
    envvar="EMULATOR_MONTHLY_QUOTA",
    help="Conversions accepted per API key per calendar month (UTC); then submissions "
    "get 402 {error, quota, used, resetDate} while status and usage calls keep working. "
    "[default: no quota]",
)
@click.option(
    "--monthly-quota-period-s",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    envvar="EMULATOR_MONTHLY_QUOTA_PERIOD_S",
    help="Test-only: count the quota per fixed period of this many seconds (resetDate is "
    "its end) instead of per calendar month. [default: calendar month]",
)
@click.option(
    "--processing-median-s",
    type=click.FloatRange(min=0, min_open=True),
    default=_DEFAULTS.processing_median_s,
    show_default=True,
    envvar="EMULATOR_PROCESSING_MEDIAN_S",
    help="Median seconds from submit to SUCCESS/ERROR (log-normal).",
)
@click.option(
    "--processing-sigma",
    type=click.FloatRange(min=0),
    default=_DEFAULTS.processing_sigma,
    show_default=True,
    envvar="EMULATOR_PROCESSING_SIGMA",
    help="Spread of the log-normal processing time (sigma of ln seconds).",
)
@click.option(
    "--processing-median-for",
    "medians_by_type",
    multiple=True,
    callback=_parse_medians,
    metavar="TYPE=SECONDS",
    envvar="EMULATOR_PROCESSING_MEDIAN_FOR",
    help="Median for one document type, e.g. invoice=5 (repeatable).",
)
@click.option(
    "--enqueued-fraction",
    type=click.FloatRange(0, 1),
    default=_DEFAULTS.enqueued_fraction,
    show_default=True,
    envvar="EMULATOR_ENQUEUED_FRACTION",
    help="Up to this share of the duration is spent ENQUEUED, the rest PROCESSING.",
)
@click.option(
    "--processing-give-up-s",
    type=click.FloatRange(min=0, min_open=True),
    default=_DEFAULTS.processing_give_up_s,
    show_default=True,
    envvar="EMULATOR_PROCESSING_GIVE_UP_S",
    help="Conversions drawn longer than this end in ERROR 'Processing timeout after 60 minutes'.",
)
@click.option(
    "--error-rate",
    type=click.FloatRange(0, 1),
    default=_DEFAULTS.error_rate,
    show_default=True,
    envvar="EMULATOR_ERROR_RATE",
    help="Share of conversions that end in ERROR.",
)
@click.option(
    "--fault-500-rate",
    type=click.FloatRange(0, 1),
    default=_DEFAULTS.fault_500_rate,
    show_default=True,
    envvar="EMULATOR_FAULT_500_RATE",
    help="Share of API calls answered with an injected 500.",
)
@click.option(
    "--slow-response-rate",
    type=click.FloatRange(0, 1),
    default=_DEFAULTS.slow_response_rate,
    show_default=True,
    envvar="EMULATOR_SLOW_RESPONSE_RATE",
    help="Share of API calls delayed by --slow-response-s before answering.",
)
@click.option(
    "--slow-response-s",
    type=click.FloatRange(min=0),
    default=_DEFAULTS.slow_response_s,
    show_default=True,
    envvar="EMULATOR_SLOW_RESPONSE_S",
    help="Delay of a slow call, in seconds.",
)
@click.option(
    "--webhook-url",
    "webhook_urls",
    multiple=True,
    envvar="EMULATOR_WEBHOOK_URLS",
    help="POST every conversion event (CONVERSION_STARTED, _COMPLETED, _FAILED) here "
    "(repeatable; EMULATOR_WEBHOOK_URLS takes a whitespace-separated list).",
)
@click.option(
    "--webhook-event",
    "webhook_events",
    multiple=True,
    type=click.Choice(list(WEBHOOK_EVENTS)),
    envvar="EMULATOR_WEBHOOK_EVENTS",
    help="Send only these events (repeatable) [default: all three].",
)
@click.option(
    "--webhook-drop-rate",
    type=click.FloatRange(0, 1),
    default=_DEFAULTS.webhook_drop_rate,
    show_default=True,
    envvar="EMULATOR_WEBHOOK_DROP_RATE",
    help="Share of events never delivered (per URL).",
)
@click.option(
    "--webhook-duplicate-rate",
    type=click.FloatRange(0, 1),
    default=_DEFAULTS.webhook_duplicate_rate,
    show_default=True,
    envvar="EMULATOR_WEBHOOK_DUPLICATE_RATE",
    help="Share of events delivered twice (per URL).",
)
@click.option(
    "--webhook-delay-s",
    type=click.FloatRange(min=0),
    default=_DEFAULTS.webhook_delay_s,
    show_default=True,
    envvar="EMULATOR_WEBHOOK_DELAY_S",
    help="Seconds from an event to its first delivery attempt.",
)
@click.option(
    "--webhook-max-attempts",
    type=click.IntRange(1, 20),
    default=_DEFAULTS.webhook_max_attempts,
    show_default=True,
    envvar="EMULATOR_WEBHOOK_MAX_ATTEMPTS",
    help="Attempts per delivery; a non-2xx answer, timeout or refused connection retries.",
)
@click.option(
    "--webhook-retry-delay-s",
    type=click.FloatRange(min=0),
    default=_DEFAULTS.webhook_retry_delay_s,
    show_default=True,
    envvar="EMULATOR_WEBHOOK_RETRY_DELAY_S",
    help="Wait before the first retry of a delivery; doubles each retry.",
)
@click.option(
    "--webhook-timeout-s",
    type=click.FloatRange(min=0, min_open=True),
    default=_DEFAULTS.webhook_timeout_s,
    show_default=True,
    envvar="EMULATOR_WEBHOOK_TIMEOUT_S",
    help="Seconds a webhook receiver may take to answer (DocuTray allows 30).",
)
@click.option(
    "--seed",
    type=int,
    default=_DEFAULTS.seed,
    show_default=True,
    envvar="EMULATOR_SEED",
    help="Seed of faults, durations, outcomes and data: same seed and calls, same run.",
)
@click.option(
    "--finished-ttl-s",
    type=click.FloatRange(min=0, min_open=True),
    default=_DEFAULTS.finished_ttl_s,
    show_default=True,
    envvar="EMULATOR_FINISHED_TTL_S",
    help="Seconds a finished conversion stays queryable before status is 404.",
)
@click.option(
    "--public-base-url",
    default=None,
    envvar="EMULATOR_PUBLIC_BASE_URL",
    help="Base of the status_url in 202 answers [default: the request's own URL].",
)
@click.option(
    "--access-log/--no-access-log",
    default=False,
    show_default=True,
    envvar="EMULATOR_ACCESS_LOG",
    help="Log every HTTP request (uvicorn access log).",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="warning",
    show_default=True,
    envvar="EMULATOR_LOG_LEVEL",
    help="Level of the emulator's and uvicorn's logs.",
)
def emulator_command(
    *,
    host: str,
    port: int,
    api_keys: tuple[str, ...],
    access_log: bool,
    log_level: str,
    **knobs: Any,
) -> None:
    """Run the local DocuTray API emulator (same paths, bodies and errors as the real API).

    Emulator-only routes for tests live under /_emulator/ (stats, config, forget,
    reset-stats) and need no API key. POST /_emulator/config changes at run time:
    the fault rates, rate_limit_per_minute/_per_hour/_per_day and the hour/day window
    lengths, monthly_quota and monthly_quota_period_s (null
    switches a limit or the quota off), the processing medians and every webhook_*
    knob. Webhook faults (drop, duplicate) are seeded like every other draw.
    """
    _configure_logging(log_level, api_keys)
    config = config_from_options(api_keys=api_keys, **knobs)
    if not config.api_keys:
        click.echo("warning: no --api-key given; every API call will get 401", err=True)
    _serve(config, host=host, port=port, access_log=access_log, log_level=log_level)


def config_from_options(**options: Any) -> EmulatorConfig:
    """The `EmulatorConfig` the command's options describe (a bad combination is a usage error).

    Options are named like the config's fields, except that 0 switches a rate limit
    off (None in the config), no ``--webhook-event`` means all three, and the
    per-type medians arrive as ``medians_by_type``.
    """
    values = {
        name: list(value) if isinstance(value, tuple) else value for name, value in options.items()
    }
    values["processing_median_s_by_type"] = values.pop("medians_by_type", {})
    for name in ("rate_limit_per_minute", "rate_limit_per_hour", "rate_limit_per_day"):
        values[name] = values.get(name) or None
    values["webhook_events"] = values.get("webhook_events") or list(WEBHOOK_EVENTS)
    try:
        return EmulatorConfig.model_validate(values)
    except ValidationError as exc:
        raise click.UsageError(str(exc)) from exc


def _serve(
    config: EmulatorConfig, *, host: str, port: int, access_log: bool, log_level: str
) -> None:
    """Bind, print the one `emulator listening on ...` line, and serve until stopped."""
    sock = _bind(host, port)
    bound_host, bound_port = sock.getsockname()[:2]
    shown_host = f"[{bound_host}]" if ":" in bound_host else bound_host
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(config),
            log_level=log_level,
            log_config=None,  # uvicorn logs through the service's (scrubbing) handlers
            access_log=access_log,
            lifespan="on",
            server_header=False,
        )
    )
    click.echo(f"emulator listening on http://{shown_host}:{bound_port}")
    sys.stdout.flush()
    server.run(sockets=[sock])
