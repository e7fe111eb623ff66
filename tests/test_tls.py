"""Kafka over TLS, end to end: the bridge and its CLI tools talk SASL_SSL (SCRAM-SHA-512).

The stack's SASL_SSL listener (`scripts/stack`: STACK_KAFKA_SSL_BOOTSTRAP, a certificate
signed by the stack's own CA, STACK_KAFKA_CA_LOCATION) is the only address the bridge and
the tools get, so every connection they open is TLS: the broker advertises the SASL_SSL
listener to clients that came in through it. The CA reaches librdkafka the two ways an
operator gives it: a file (KAFKA_SSL_CA_LOCATION → ssl.ca.location, a mounted Secret) and
PEM text in an environment variable (KAFKA_SSL_CA_PEM → ssl.ca.pem, `valueFrom` a Secret
key). The test's own producer and reader (the rig) use the PLAINTEXT listener.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from service import samples
from tests.fixtures.bridge import REPO, Rig, assert_exactly_once, pdf_request, sent_ids

#: A CA bundle that did not sign the stack's broker certificate.
SYSTEM_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"


def _tls_env(stack_env: dict[str, str], ca: str) -> dict[str, str]:
    """Bridge/CLI settings for the SASL_SSL listener, the CA as a file or as PEM text."""
    missing = [
        k
        for k in (
            "STACK_KAFKA_SSL_BOOTSTRAP",
            "STACK_KAFKA_CA_LOCATION",
            "STACK_KAFKA_SASL_PASSWORD",
        )
        if not stack_env.get(k)
    ]
    if missing:
        pytest.fail(
            f"the stack does not describe its SASL_SSL listener ({', '.join(missing)} unset): "
            "run the tests through `make test` or against scripts/stack (a stack started by an "
            "older scripts/stack gets the listener with `scripts/stack restart kafka`)"
        )
    env = {
        "KAFKA_BOOTSTRAP_SERVERS": stack_env["STACK_KAFKA_SSL_BOOTSTRAP"],
        "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "KAFKA_SASL_MECHANISM": stack_env.get("STACK_KAFKA_SASL_MECHANISM", "SCRAM-SHA-512"),
        "KAFKA_SASL_USERNAME": stack_env.get("STACK_KAFKA_SASL_USERNAME", "bridge"),
        "KAFKA_SASL_PASSWORD": stack_env["STACK_KAFKA_SASL_PASSWORD"],
    }
    ca_file = stack_env["STACK_KAFKA_CA_LOCATION"]
    if ca == "file":
        env["KAFKA_SSL_CA_LOCATION"] = ca_file
    else:
        env["KAFKA_SSL_CA_PEM"] = Path(ca_file).read_text()
    return env


def _cli(
    *args: str, env: dict[str, str], timeout_s: float = 90
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "service.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=timeout_s,
        check=False,
    )


def _own_lines(text: str) -> list[str]:
    """Output lines that are the program's own (librdkafka's raw log lines start with %)."""
    return [line for line in text.splitlines() if line.strip() and not line.startswith("%")]


@pytest.mark.parametrize("ca", ["file", "pem"], ids=["ca-file", "ca-pem-env"])
def test_bridge_and_cli_tools_work_over_sasl_ssl(
    rig_factory: Callable[..., Rig], stack_env: dict[str, str], tmp_path: Path, ca: str
) -> None:
    tls = _tls_env(stack_env, ca)
    rig: Rig = rig_factory(**tls)
    assert rig.base_env["KAFKA_BOOTSTRAP_SERVERS"] == stack_env["STACK_KAFKA_SSL_BOOTSTRAP"]
    assert ("KAFKA_SSL_CA_LOCATION" in rig.base_env) == (ca == "file")
    bridge = rig.bridge(f"tls-{ca}")
    bridge.wait_ready()

    # Requests from the test's producer, and two sent by `docutray-bridge send` over TLS.
    requests = [pdf_request(f"tls-{ca}-{i}") for i in range(12)]
    rig.send(requests)
    document = tmp_path / "invoice.pdf"
    document.write_bytes(samples.pdf(f"Invoice over TLS ({ca})"))
    cli_ids = {f"tls-{ca}-cli-{i}" for i in range(2)}
    for rid in sorted(cli_ids):
        sent = _cli(
            "send", "--type", "invoice", "--request-id", rid, str(document), env=rig.base_env
        )
        assert sent.returncode == 0, sent.stderr
        assert sent.stdout.split() == [rid]

    ids = sent_ids(requests) | cli_ids
    grouped = rig.wait_outcomes(ids, timeout_s=120)
    assert_exactly_once(grouped, ids)
    for rid in ids:
        outcome = grouped[rid][0]
        assert outcome.result is not None, f"{rid}: {outcome.dead_letter}"

    # `docutray-bridge results` reads the outcomes back over TLS too.
    shown = _cli("results", "--json", *(f"--request-id={rid}" for rid in cli_ids), env=rig.base_env)
    assert shown.returncode == 0, shown.stderr
    read_back = [json.loads(line) for line in shown.stdout.splitlines() if line.strip()]
    assert sorted(msg["request_id"] for msg in read_back) == sorted(cli_ids)
    assert bridge.metric("docutray_bridge_results_published_total") == len(ids)
    assert bridge.stop() == 0
    log = bridge.log_path.read_text(errors="replace")
    assert "SSL handshake failed" not in log
    assert "Traceback" not in log


def test_bridge_with_the_wrong_ca_stops_with_one_clear_line(
    rig_factory: Callable[..., Rig], stack_env: dict[str, str]
) -> None:
    tls = {**_tls_env(stack_env, "file"), "KAFKA_SSL_CA_LOCATION": SYSTEM_CA_BUNDLE}
    rig: Rig = rig_factory(**tls)
    bridge = rig.bridge("wrong-ca")
    assert bridge.proc is not None
    code = bridge.proc.wait(120)
    assert code != 0
    assert not bridge.ready()
    text = bridge.log_path.read_text(errors="replace")
    assert "Traceback" not in text, text[-3000:]
    errors = [line for line in _own_lines(text) if line.startswith("error: ")]
    assert len(errors) == 1, _own_lines(text)[-8:]
    assert "certificate verify failed" in errors[0], errors[0]


@pytest.mark.parametrize("command", ["send", "results"])
def test_cli_tools_with_the_wrong_ca_fail_with_one_clear_line(
    rig_factory: Callable[..., Rig], stack_env: dict[str, str], tmp_path: Path, command: str
) -> None:
    tls = {**_tls_env(stack_env, "file"), "KAFKA_SSL_CA_LOCATION": SYSTEM_CA_BUNDLE}
    rig: Rig = rig_factory(**tls)
    document = tmp_path / "invoice.pdf"
    document.write_bytes(samples.pdf("Invoice, wrong CA"))
    args = ["send", "--type", "invoice", str(document)] if command == "send" else ["results"]
    result = _cli(*args, env=rig.base_env)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in _own_lines(result.stderr) if line.startswith("error: ")]
    assert len(errors) == 1, _own_lines(result.stderr)[-8:]
    assert "certificate verify failed" in errors[0], errors[0]
