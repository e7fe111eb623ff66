"""The `docutray-bridge` command line.

Every command has ``--help``; failures exit non-zero with one line that says
why (no traceback unless ``BRIDGE_LOG_LEVEL=debug``).
"""

from __future__ import annotations

import asyncio
import json
import sys
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

import click

from service import __version__
from service.config import Settings, SettingsError, kafka_common_config, load_settings, redacted
from service.errors import BridgeError
from service.logging import configure_logging, scrub

#: Exit codes: a runtime failure (Kafka refused, a check failed) is 1; a usage or
#: configuration error (a bad option or setting, click's own errors) is 2.
EXIT_FAILED, EXIT_USAGE = 1, 2


def _fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    # Scrubbed like a log line: an error from a library may quote a registered secret.
    click.echo(f"error: {scrub(message)}", err=True)
    sys.exit(code)


def _usage(message: str) -> NoReturn:
    _fail(message, EXIT_USAGE)


def _settings(**overrides: Any) -> Settings:
    try:
        return load_settings(**overrides)
    except SettingsError as exc:
        _usage(str(exc))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="docutray-bridge")
def main() -> None:
    """Kafka bridge to DocuTray's asynchronous OCR API.

    Configuration comes from the environment only (BRIDGE_*, DOCUTRAY_*,
    KAFKA_*, REDIS_URL); see the README's settings table.
    """


@main.command()
def run() -> None:
    """Run the bridge: consume requests, convert them, publish results and dead letters."""
    settings = _settings()
    configure_logging(fmt=settings.log_format, level=settings.log_level)
    if not settings.docutray_api_key.get_secret_value():
        _usage("DOCUTRAY_API_KEY is not set")
    from service.app import run_bridge
    from service.memory import return_freed_memory

    return_freed_memory()
    try:
        code = asyncio.run(run_bridge(settings))
    except BridgeError as exc:
        _fail(str(exc))
    sys.exit(code)


@main.command("settings")
def show_settings() -> None:
    """Print the effective settings (secrets masked) and the Kafka pass-through properties."""
    settings = _settings()
    values = settings.model_dump(mode="json")
    values["docutray_api_key"] = "***" if settings.docutray_api_key.get_secret_value() else ""
    values["redis_url"] = "***" if settings.redis else ""
    values["kafka"] = redacted(kafka_common_config(settings))
    click.echo(json.dumps(values, indent=2, sort_keys=True))


@main.command()
@click.argument("targets", nargs=-1, required=True)
@click.option("--type", "doc_type", required=True, help="Document type code, e.g. invoice.")
@click.option("--metadata", default=None, help="JSON object forwarded as document_metadata.")
@click.option("--request-id", default=None, help="Request id (only with one target).")
@click.option("--topic", default=None, help="Input topic (default: BRIDGE_INPUT_TOPIC).")
def send(
    targets: tuple[str, ...],
    doc_type: str,
    metadata: str | None,
    request_id: str | None,
    topic: str | None,
) -> None:
    """Send document requests: local files (as base64) or http(s) URLs. Prints the request ids."""
    from service.tools import ToolError, build_request, produce_requests

    settings = _settings()
    meta: dict[str, Any] | None = None
    if metadata is not None:
        try:
            meta = json.loads(metadata)
        except ValueError as exc:
            _usage(f"--metadata is not JSON: {exc}")
        if not isinstance(meta, dict):
            _usage("--metadata must be a JSON object")
    if request_id is not None and len(targets) > 1:
        _usage("--request-id works with one target only")
    try:
        reqs = [
            build_request(
                t,
                document_type_code=doc_type,
                metadata=meta,
                request_id=request_id,
                max_bytes=settings.max_request_bytes,
            )
            for t in targets
        ]
        produce_requests(kafka_common_config(settings), topic or settings.input_topic, reqs)
    except ToolError as exc:
        _fail(str(exc))
    for req in reqs:
        click.echo(req.request_id)


@main.command()
@click.option("--follow", "-f", is_flag=True, help="Keep waiting for new outcomes.")
@click.option("--json", "as_json", is_flag=True, help="Print raw JSON messages.")
@click.option("--request-id", "request_ids", multiple=True, help="Only these request ids.")
@click.option("--result-topic", default=None, help="Default: BRIDGE_RESULT_TOPIC.")
@click.option("--dead-letter-topic", default=None, help="Default: BRIDGE_DEAD_LETTER_TOPIC.")
def results(
    follow: bool,
    as_json: bool,
    request_ids: tuple[str, ...],
    result_topic: str | None,
    dead_letter_topic: str | None,
) -> None:
    """Show results and dead letters (read_committed), from the beginning."""
    from service.tools import ToolError, format_outcome, read_outcomes

    settings = _settings()
    topics = [
        result_topic or settings.result_topic,
        dead_letter_topic or settings.dead_letter_topic,
    ]
    wanted = set(request_ids)
    count = 0
    try:
        for outcome in read_outcomes(kafka_common_config(settings), topics, follow=follow):
            if wanted and outcome.request_id not in wanted:
                continue
            count += 1
            click.echo(
                outcome.raw.decode("utf-8", "replace") if as_json else format_outcome(outcome)
            )
    except ToolError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        pass
    if not as_json:
        click.echo(f"-- {count} outcome(s)", err=True)


@main.group("dead-letters")
def dead_letters() -> None:
    """Inspect and replay dead letters."""


@dead_letters.command("replay")
@click.option("--reason", default=None, help="Only dead letters with this reason code.")
@click.option(
    "--since",
    default=None,
    help="Only dead letters that failed at or after this ISO-8601 time (e.g. 2026-11-30T10:00Z).",
)
@click.option("--request-id", "request_ids", multiple=True, help="Only these request ids.")
@click.option("--dry-run", is_flag=True, help="Show what would be replayed; send nothing.")
@click.option("--to-topic", default=None, help="Default: each record's original topic.")
def replay(
    reason: str | None,
    since: str | None,
    request_ids: tuple[str, ...],
    dry_run: bool,
    to_topic: str | None,
) -> None:
    """Put dead-lettered requests back on the input topic (original key, value, headers)."""
    from service.messages import DeadLetterReason
    from service.tools import ToolError, replay_dead_letters

    settings = _settings()
    if reason is not None and reason not in {r.value for r in DeadLetterReason}:
        _usage(
            f"unknown --reason {reason!r}; one of {', '.join(r.value for r in DeadLetterReason)}"
        )
    since_dt: datetime | None = None
    if since is not None:
        try:
            since_dt = datetime.fromisoformat(since.replace("Z", "+00:00"))
        except ValueError:
            _usage(f"--since {since!r} is not an ISO-8601 time")
        if since_dt.tzinfo is None:
            _usage("--since needs a time zone (e.g. 2026-11-30T10:00Z)")

    def progress(n: int) -> None:
        if n % 100 == 0:
            click.echo(f"  replayed {n}...", err=True)

    try:
        plan = replay_dead_letters(
            kafka_common_config(settings),
            settings.dead_letter_topic,
            input_topic=to_topic,
            reason=reason,
            since=since_dt,
            request_ids=set(request_ids) or None,
            dry_run=dry_run,
            progress=progress,
        )
    except ToolError as exc:
        _fail(str(exc))
    for letter in plan.selected:
        click.echo(f"{letter.request_id or '(no id)'}  {letter.reason.value}  {letter.message}")
    verb = "would replay" if dry_run else "replayed"
    click.echo(
        f"{verb} {len(plan.selected)} dead letter(s); {plan.skipped} unreadable or truncated skipped"
    )


@main.command()
@click.option("--dir", "out_dir", default="schemas", show_default=True, type=click.Path())
@click.option("--check", is_flag=True, help="Fail if a file is missing or stale; write nothing.")
def schemas(out_dir: str, check: bool) -> None:
    """Write the JSON Schema of every message the bridge reads or writes."""
    from service.messages import PUBLISHED_MODELS

    stale: list[str] = []
    for stem, model in PUBLISHED_MODELS.items():
        path = Path(out_dir) / f"{stem}.schema.json"
        text = json.dumps(model.model_json_schema(), indent=2, sort_keys=True) + "\n"
        current = path.read_text() if path.exists() else None
        if current == text:
            continue
        if check:
            stale.append(str(path))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            click.echo(f"wrote {path}")
    if stale:
        _fail(f"stale schema files (run `docutray-bridge schemas`): {', '.join(stale)}")


@main.command()
@click.option("--timeout-s", default=120.0, show_default=True, help="Give up waiting after this.")
def demo(timeout_s: float) -> None:
    """Run emulator + bridge against the local Kafka, send samples, show outcomes."""
    from service.demo import DemoError, run_demo

    try:
        code = run_demo(echo=click.echo, timeout_s=timeout_s)
    except DemoError as exc:
        _fail(str(exc))
    sys.exit(code)


def _register_emulator() -> None:
    from service.emulator.cli import emulator_command

    main.add_command(emulator_command, "emulator")


_register_emulator()

if __name__ == "__main__":
    main()
