"""The command line: help everywhere, one-line failures, no secret ever printed.

Only paths that fail (or finish) before touching Kafka are exercised here;
the commands that talk to the broker are tested end to end elsewhere.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result

from service.cli import main
from service.emulator.cli import config_from_options, emulator_command
from service.emulator.config import EmulatorConfig
from service.kafka.topics import TopicError
from service.logging import register_secret
from service.messages import DeadLetterReason

API_KEY = "dtk_live_Hx7Kp2Qm9Wz4Rt6Yv1Nb"
REDIS_PASSWORD = "r3d1s-cl1-pa55-8c7b6a"
SASL_PASSWORD = "sc4am-cl1-pa55-5f4e3d"
EMULATOR_KEY = "emu-key-3e9f1a7c5b"
SECRETS = (API_KEY, REDIS_PASSWORD, SASL_PASSWORD, EMULATOR_KEY)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No bridge variables from the outer environment, and logging restored afterwards."""
    for name in list(os.environ):
        upper = name.upper()
        if upper.startswith(("BRIDGE_", "DOCUTRAY_", "KAFKA_", "EMULATOR_")) or upper in {
            "REDIS_URL",
        }:
            monkeypatch.delenv(name)
    return monkeypatch


#: Commands configure logging on the runner's (soon closed) stderr: undo that.
pytestmark = pytest.mark.usefixtures("restore_logging")


@pytest.fixture
def secret_env(clean_env: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    clean_env.setenv("DOCUTRAY_API_KEY", API_KEY)
    clean_env.setenv("REDIS_URL", f"redis://bridge:{REDIS_PASSWORD}@127.0.0.1:6379/0")
    clean_env.setenv("KAFKA_SASL_USERNAME", "bridge-user")
    clean_env.setenv("KAFKA_SASL_PASSWORD", SASL_PASSWORD)
    clean_env.setenv("EMULATOR_API_KEYS", EMULATOR_KEY)
    return clean_env


def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def assert_one_line_error(result: Result, *, code: int = 2) -> str:
    assert result.exit_code == code, (result.exit_code, result.output)
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.output
    return lines[0]


def assert_no_secret(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text


def command_paths(group: click.Command, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = [prefix]
    if isinstance(group, click.Group):
        for name, command in sorted(group.commands.items()):
            paths.extend(command_paths(command, (*prefix, name)))
    return paths


COMMAND_PATHS = command_paths(main)


def test_the_expected_commands_exist() -> None:
    assert {
        (),
        ("run",),
        ("settings",),
        ("send",),
        ("results",),
        ("dead-letters",),
        ("dead-letters", "replay"),
        ("schemas",),
        ("demo",),
        ("emulator",),
    } <= set(COMMAND_PATHS)


@pytest.mark.parametrize("path", COMMAND_PATHS, ids=lambda p: " ".join(p) or "(main)")
def test_help_works_everywhere_and_shows_no_secret(
    secret_env: pytest.MonkeyPatch, path: tuple[str, ...]
) -> None:
    for flag in ("--help", "-h") if not path else ("--help",):
        result = invoke(*path, flag)
        assert result.exit_code == 0, result.output
        assert result.stdout.startswith("Usage: ")
        assert_no_secret(result.output)


def test_main_help_lists_the_commands() -> None:
    text = invoke("--help").stdout
    for name in ("run", "settings", "send", "results", "dead-letters", "schemas", "demo"):
        assert name in text


def test_version() -> None:
    result = invoke("--version")
    assert result.exit_code == 0
    assert result.stdout.startswith("docutray-bridge, version ")


# --------------------------------------------------------------------------- run


def test_run_without_api_key_fails_with_one_line() -> None:
    line = assert_one_line_error(invoke("run"))
    assert "DOCUTRAY_API_KEY" in line


@pytest.mark.parametrize("command", [("run",), ("settings",), ("send", "x.pdf", "--type", "i")])
def test_bad_setting_fails_with_one_line_naming_it(
    secret_env: pytest.MonkeyPatch, command: tuple[str, ...]
) -> None:
    secret_env.setenv("BRIDGE_MAX_PENDING", "abc")
    result = invoke(*command)
    line = assert_one_line_error(result)
    assert "BRIDGE_MAX_PENDING" in line
    assert_no_secret(result.output)


# --------------------------------------------------------------------------- settings


def test_settings_prints_json_with_secrets_masked(secret_env: pytest.MonkeyPatch) -> None:
    secret_env.setenv("BRIDGE_GROUP_ID", "billing")
    secret_env.setenv("KAFKA_SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    result = invoke("settings")
    assert result.exit_code == 0, result.output
    assert_no_secret(result.output)
    values = json.loads(result.stdout)
    assert values["docutray_api_key"] == "***"
    assert values["redis_url"] == "***"
    assert values["group_id"] == "billing"
    assert values["kafka"]["sasl.password"] == "***"
    assert values["kafka"]["sasl.username"] == "bridge-user"
    assert values["kafka"]["security.protocol"] == "SASL_PLAINTEXT"
    assert "bootstrap.servers" in values["kafka"]


def test_settings_shows_unset_secrets_as_empty() -> None:
    values = json.loads(invoke("settings").stdout)
    assert values["docutray_api_key"] == ""
    assert values["redis_url"] == ""


# --------------------------------------------------------------------------- send


def test_send_missing_file_fails_with_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "no-such.pdf"
    # A runtime failure (the file cannot be read): 1; usage errors are 2.
    line = assert_one_line_error(invoke("send", str(missing), "--type", "invoice"), code=1)
    assert str(missing) in line


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [("{not json", "--metadata is not JSON"), ("[1, 2]", "--metadata must be a JSON object")],
)
def test_send_bad_metadata_fails_with_one_line(metadata: str, expected: str) -> None:
    line = assert_one_line_error(
        invoke("send", "https://x.example/a.pdf", "--type", "invoice", "--metadata", metadata)
    )
    assert expected in line


def test_send_request_id_needs_one_target() -> None:
    line = assert_one_line_error(
        invoke(
            "send",
            "https://x.example/a.pdf",
            "https://x.example/b.pdf",
            "--type",
            "invoice",
            "--request-id",
            "r-1",
        )
    )
    assert "--request-id" in line


def test_send_needs_a_type() -> None:
    result = invoke("send", "https://x.example/a.pdf")
    assert result.exit_code == 2
    assert "--type" in result.stderr


# --------------------------------------------------------------------------- replay


def test_replay_unknown_reason_lists_the_valid_ones() -> None:
    line = assert_one_line_error(invoke("dead-letters", "replay", "--reason", "bogus"))
    assert "'bogus'" in line
    for reason in DeadLetterReason:
        assert reason.value in line


def test_replay_since_without_time_zone_fails() -> None:
    line = assert_one_line_error(invoke("dead-letters", "replay", "--since", "2026-11-30T10:00:00"))
    assert "time zone" in line


def test_replay_since_not_a_time_fails() -> None:
    line = assert_one_line_error(invoke("dead-letters", "replay", "--since", "yesterday"))
    assert "'yesterday'" in line
    assert "ISO-8601" in line


# --------------------------------------------------------------------------- schemas


def test_schemas_check_passes_on_the_committed_files() -> None:
    schemas = Path(__file__).resolve().parent.parent / "schemas"
    result = invoke("schemas", "--check", "--dir", str(schemas))
    assert result.exit_code == 0, result.output
    assert result.output == ""


def test_stale_schemas_fail_with_one_line_and_exit_1(tmp_path: Path) -> None:
    (tmp_path / "conversion_request.schema.json").write_text("{}\n")
    line = assert_one_line_error(invoke("schemas", "--check", "--dir", str(tmp_path)), code=1)
    assert "stale schema files" in line
    assert not (tmp_path / "conversion_result.schema.json").exists()  # --check writes nothing


# --------------------------------------------------------------------------- exit codes


def test_click_usage_errors_exit_2() -> None:
    for args in (("run", "--no-such-option"), ("no-such-command",), ("results", "--follow=x")):
        result = invoke(*args)
        assert result.exit_code == 2, (args, result.output)
        assert "Traceback" not in result.output


def test_run_exits_1_with_one_line_when_the_bridge_fails(
    secret_env: pytest.MonkeyPatch,
) -> None:
    import service.app
    import service.memory

    async def failing_bridge(settings: object) -> int:
        raise TopicError(f"topic 'requests' is missing (key {API_KEY} must not show)")

    register_secret(API_KEY)
    secret_env.setattr(service.memory, "return_freed_memory", lambda: None)
    secret_env.setattr(service.app, "run_bridge", failing_bridge)
    result = invoke("run")
    line = assert_one_line_error(result, code=1)
    assert "topic 'requests' is missing" in line
    assert_no_secret(result.output)


def test_run_passes_the_bridge_exit_code_through(secret_env: pytest.MonkeyPatch) -> None:
    import service.app
    import service.memory

    async def stopped_bridge(settings: object) -> int:
        return 1  # e.g. Kafka did not close in time

    secret_env.setattr(service.memory, "return_freed_memory", lambda: None)
    secret_env.setattr(service.app, "run_bridge", stopped_bridge)
    assert invoke("run").exit_code == 1


# --------------------------------------------------------------------------- emulator


def test_emulator_options_map_onto_the_emulator_config() -> None:
    ctx = emulator_command.make_context(
        "emulator",
        ["--rate-limit-per-minute", "30", "--processing-median-for", "invoice=3", "--seed", "7"],
    )
    knobs = {
        k: v for k, v in ctx.params.items() if k not in ("host", "port", "access_log", "log_level")
    }
    config = config_from_options(**knobs)
    assert config.rate_limit_per_minute == 30
    assert config.processing_median_s_by_type == {"invoice": 3.0}
    assert config.seed == 7
    defaults = emulator_command.make_context("emulator", []).params
    plain = config_from_options(
        **{
            k: v
            for k, v in defaults.items()
            if k not in ("host", "port", "access_log", "log_level")
        }
    )
    # Option defaults are the config's own (0 = no rate limit, every webhook event).
    assert plain == EmulatorConfig()


def test_emulator_option_combinations_the_config_refuses_are_usage_errors() -> None:
    with pytest.raises(click.UsageError):
        config_from_options(processing_median_s=-1.0)
