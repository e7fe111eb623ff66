"""The container image, built and run for real: read-only root, uid 10001, the local stack.

`scripts/image` (`make image`) builds localhost/docutray-bridge:dev with docker or podman,
on a Python base made from Debian's packages where no registry answers. `make test` starts
that build in the background; the module fixture runs scripts/image again, which waits for
the background build's lock and then finds every layer cached (seconds).

Containers run as production runs them: `--read-only` with a tmpfs on /tmp only, every
capability dropped, no-new-privileges, the image's own user, host networking to reach the
local Kafka, Redis and the emulator on 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.devkit.processes import OpsEndpoint
from tests.fixtures.bridge import Rig, assert_exactly_once, free_port, pdf_request, sent_ids
from tests.fixtures.emulator import EmulatorStarter
from tests.fixtures.stack import wait_for

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "image"
# scripts/image writes the id of the image it built here (the tag is shared by checkouts).
IMAGE_ID = ROOT / ".cache" / "image" / "image.id"
# A cold build (debootstrap, Debian's Python, the wheels) takes minutes; warm, seconds.
BUILD_TIMEOUT_S = 1500
GRACE_S = 15

pytestmark = pytest.mark.timeout(BUILD_TIMEOUT_S + 300)


def _run(*args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(args), capture_output=True, text=True, timeout=timeout_s, check=False, cwd=ROOT
    )


DEPENDENCY_INPUTS = ("Dockerfile", "deploy/image/debian-python.Dockerfile", "pyproject.toml")


def build_inputs(*, dependencies_only: bool = False) -> str:
    """A digest of what the build reads (the files .dockerignore lets through, the Dockerfiles),
    or of what the dependency layers read (then a rebuild downloads nothing)."""
    files = [ROOT / name for name in (*DEPENDENCY_INPUTS, "constraints.txt")]
    if not dependencies_only:
        files.append(ROOT / "README.md")
        files += sorted(p for p in (ROOT / "service").rglob("*") if "__pycache__" not in p.parts)
    digest = hashlib.sha256()
    for path in files:
        if path.is_file() and path.suffix not in {".pyc", ".pyo", ".pyd"}:
            digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class Build:
    engine: list[str]  # e.g. ["podman", "--runtime", "runc"]
    image: str  # the image's id
    inputs: str  # build_inputs() when the build started
    dependency_inputs: str  # build_inputs(dependencies_only=True) then


@pytest.fixture(scope="module")
def build() -> Build:
    """The image, built (or found up to date) by scripts/image."""
    inputs, dependency_inputs = build_inputs(), build_inputs(dependencies_only=True)
    proc = _run(str(SCRIPT), timeout_s=BUILD_TIMEOUT_S)
    assert proc.returncode == 0, f"scripts/image failed:\n{proc.stderr[-6000:]}"
    which = _run(str(SCRIPT), "--engine")
    assert which.returncode == 0, which.stderr
    engine = shlex.split(which.stdout.strip())
    return Build(engine, IMAGE_ID.read_text().strip(), inputs, dependency_inputs)


@pytest.fixture(scope="module")
def engine(build: Build) -> list[str]:
    """The engine command scripts/image builds with; tests run containers with it."""
    return build.engine


@pytest.fixture(scope="module")
def image(build: Build) -> str:
    """The id of the image scripts/image built."""
    return build.image


def run_args(engine: list[str]) -> list[str]:
    """`<engine> run` as production runs the image (the caller adds name, env, command)."""
    args = [*engine, "run", "--network", "host", "--read-only", "--tmpfs", "/tmp"]
    args += ["--ulimit", "nofile=20000:20000", "--ulimit", "nproc=1000:1000"]
    args += ["--cap-drop", "ALL", "--security-opt", "no-new-privileges"]
    # The tests run the image's HEALTHCHECK command themselves (podman's timers need systemd).
    args += ["--no-healthcheck"]
    if engine[0] == "podman":
        # With --read-only podman also mounts tmpfs on /run and /var/tmp; only /tmp here.
        args.append("--read-only-tmpfs=false")
    return args


def image_inspect(engine: list[str], image: str) -> dict[str, Any]:
    proc = _run(*engine, "image", "inspect", image)
    assert proc.returncode == 0, proc.stderr
    data: dict[str, Any] = json.loads(proc.stdout)[0]
    return data


def healthcheck_test(engine: list[str], image: str) -> list[str]:
    """The image's HEALTHCHECK (docker: Config.Healthcheck; podman: Healthcheck)."""
    data = image_inspect(engine, image)
    check = data["Config"].get("Healthcheck") or data.get("Healthcheck")
    assert check, "the image has no HEALTHCHECK (podman builds need --format docker)"
    test: list[str] = check["Test"]
    return test


@dataclass
class Container:
    """A detached container of the image."""

    engine: list[str]
    name: str

    def inspect(self, template: str) -> str:
        proc = _run(*self.engine, "inspect", "--format", template, self.name)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip()

    @property
    def running(self) -> bool:
        return self.inspect("{{.State.Running}}") == "true"

    def logs(self) -> str:
        proc = _run(*self.engine, "logs", self.name)
        return proc.stdout + proc.stderr

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.logs().splitlines()[-lines:])

    def stop(self, timeout_s: int) -> tuple[int, float]:
        """`<engine> stop -t timeout_s` (SIGTERM, SIGKILL after timeout_s): exit code, seconds."""
        started = time.monotonic()
        proc = _run(*self.engine, "stop", "-t", str(timeout_s), self.name, timeout_s=timeout_s + 60)
        elapsed = time.monotonic() - started
        assert proc.returncode == 0, proc.stderr
        return int(self.inspect("{{.State.ExitCode}}")), elapsed


@dataclass
class BridgeContainer(Container):
    metrics_port: int

    @property
    def ops(self) -> OpsEndpoint:
        """Its ops endpoint (host networking: on loopback)."""
        return OpsEndpoint(self.metrics_port)

    def url(self, path: str) -> str:
        return self.ops.url(path)

    def ready(self) -> bool:
        return self.ops.ready()

    def wait_ready(self, timeout_s: float = 90) -> None:
        """Wait for /readyz, failing at once (with the log) if the container exits."""
        self.ops.wait_ready(
            timeout_s,
            name=self.name,
            alive=lambda: self.running,
            tail=self.log_tail,
            interval_s=0.2,
        )


@pytest.fixture
def containers(engine: list[str]) -> Iterator[list[Container]]:
    """Every container a test starts is listed here and removed afterwards."""
    started: list[Container] = []
    yield started
    for container in started:
        _run(*engine, "rm", "-f", container.name)


def bridge_container(
    engine: list[str], image: str, containers: list[Container], rig: Rig, tmp_path: Path, name: str
) -> BridgeContainer:
    """Start `docutray-bridge run` in the image with the rig's topics, group and emulator."""
    port = free_port()
    env = {
        k: v
        for k, v in rig.base_env.items()
        if k.startswith(("BRIDGE_", "KAFKA_", "REDIS_", "DOCUTRAY_"))
    }
    env |= {
        "BRIDGE_METRICS_PORT": str(port),
        "BRIDGE_INSTANCE_ID": f"{name}-{uuid.uuid4().hex[:6]}",
    }
    env_file = tmp_path / f"{name}.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    container = BridgeContainer(engine, f"dtb-test-{name}-{uuid.uuid4().hex[:8]}", port)
    containers.append(container)
    proc = _run(
        *run_args(engine), "-d", "--name", container.name, "--env-file", str(env_file), image, "run"
    )
    assert proc.returncode == 0, proc.stderr
    return container


def test_the_image_runs_as_uid_10001_on_a_read_only_root(engine: list[str], image: str) -> None:
    config = image_inspect(engine, image)["Config"]
    assert config["User"] == "10001:10001"
    assert config["Entrypoint"] == ["docutray-bridge"]
    assert config["Cmd"] == ["run"]
    assert healthcheck_test(engine, image)[:2] == ["CMD", "python"]
    probe = """
        id -u
        python -c 'import os; print("root read-only:", bool(os.statvfs("/").f_flag & os.ST_RDONLY))'
        python -c 'import service; print("package:", service.__file__)'
        for d in / /etc /opt/venv /opt/venv/bin /usr/local /var/tmp /run /tmp; do
            touch "$d/.probe" 2>/dev/null && echo "writable: $d"
        done
        true
    """
    proc = _run(*run_args(engine), "--rm", "--entrypoint", "sh", image, "-c", probe)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.split()
    assert proc.stdout.splitlines()[0] == "10001", proc.stdout
    assert "root read-only: True" in proc.stdout, proc.stdout
    assert "package: /opt/venv/lib/python3.11/site-packages/service/__init__.py" in proc.stdout
    writable = [lines[i + 1] for i, word in enumerate(lines) if word == "writable:"]
    assert writable == ["/tmp"], proc.stdout


def test_the_bridge_in_the_image_processes_requests_and_drains_on_sigterm(
    engine: list[str],
    image: str,
    containers: list[Container],
    rig_factory: Callable[..., Rig],
    emulator_factory: EmulatorStarter,
    tmp_path: Path,
) -> None:
    emulator = emulator_factory(processing_median_s=1.0, processing_sigma=0.3)
    rig = rig_factory(emulator, BRIDGE_SHUTDOWN_GRACE_S=str(GRACE_S))
    first = bridge_container(engine, image, containers, rig, tmp_path, "b1")
    first.wait_ready()

    # The image's HEALTHCHECK, as configured, run inside the container.
    check = healthcheck_test(engine, image)[1:]
    health = _run(*engine, "exec", first.name, *check, timeout_s=30)
    assert health.returncode == 0, health.stdout + health.stderr

    batch = [pdf_request(f"img-{i}") for i in range(20)]
    rig.send(batch)
    grouped = rig.wait_outcomes(sent_ids(batch), timeout_s=120)
    assert_exactly_once(grouped, sent_ids(batch))
    failed = {rid: o[0].dead_letter for rid, o in grouped.items() if o[0].result is None}
    assert not failed, failed

    # SIGTERM under load: the bridge drains within its grace period and exits 0.
    load = [pdf_request(f"img-term-{i}") for i in range(80)]
    rig.send(load)
    wait_for(
        lambda: emulator.stats()["submissions_accepted"] >= len(batch) + 30,
        90,
        message="conversions under way",
    )
    code, elapsed = first.stop(GRACE_S + 5)
    logs = first.logs()
    assert code == 0, f"exit code {code} after SIGTERM:\n{first.log_tail()}"
    assert elapsed < GRACE_S + 2, f"stop took {elapsed:.1f} s (grace {GRACE_S} s)"
    assert "bridge_stopping" in logs

    # A second container takes over what was left: every request has exactly one outcome.
    second = bridge_container(engine, image, containers, rig, tmp_path, "b2")
    second.wait_ready()
    ids = sent_ids(batch) | sent_ids(load)
    grouped = rig.wait_outcomes(ids, timeout_s=180)
    assert_exactly_once(grouped, ids)
    per_request = emulator.stats()["conversions_by_request_id"]
    assert max(per_request.values()) == 1, {k: v for k, v in per_request.items() if v > 1}
    code, _ = second.stop(GRACE_S + 5)
    assert code == 0, second.log_tail()
    for container, text in ((first, logs), (second, second.logs())):
        for bad in ("Traceback", "Read-only file system", "Permission denied"):
            assert bad not in text, f"{container.name}: {bad}\n{text[-3000:]}"


def test_demo_runs_in_the_image(
    engine: list[str], image: str, kafka_bootstrap: str, redis_url: str
) -> None:
    env = ["-e", f"KAFKA_BOOTSTRAP_SERVERS={kafka_bootstrap}", "-e", f"REDIS_URL={redis_url}"]
    proc = _run(*run_args(engine), "--rm", *env, image, "demo", timeout_s=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "0 missing; bridge exit code 0" in proc.stdout, proc.stdout


def test_the_emulator_runs_in_the_image(
    engine: list[str], image: str, containers: list[Container]
) -> None:
    """docker-compose.yml runs the emulator from this image too."""
    port = free_port()
    container = Container(engine, f"dtb-test-emulator-{uuid.uuid4().hex[:8]}")
    containers.append(container)
    command = ["emulator", "--host", "127.0.0.1", "--port", str(port), "--api-key", "k"]
    proc = _run(*run_args(engine), "-d", "--name", container.name, image, *command)
    assert proc.returncode == 0, proc.stderr

    def healthy() -> bool:
        if not container.running:
            raise AssertionError(f"emulator exited:\n{container.log_tail()}")
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200

    wait_for(healthy, 60, interval_s=0.2, message="emulator in the image answers /healthz")
    code, _ = container.stop(10)
    assert code == 0, container.log_tail()


def test_a_second_build_reuses_every_layer(build: Build) -> None:
    """Warm: no debootstrap, no download, seconds; the same image when no input changed.

    Where others edit a shared checkout meanwhile, the image rightly changes (and a change to
    the dependencies downloads them): those checks apply when their inputs stayed the same.
    """
    inputs, dependency_inputs = build_inputs(), build_inputs(dependencies_only=True)
    started = time.monotonic()
    proc = _run(str(SCRIPT), timeout_s=BUILD_TIMEOUT_S)
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "debootstrap" not in proc.stderr
    if build_inputs(dependencies_only=True) == dependency_inputs == build.dependency_inputs:
        assert "Collecting" not in proc.stderr + proc.stdout, "pip downloaded packages again"
        assert elapsed < 120, f"a warm build took {elapsed:.0f} s"
    if build_inputs() == inputs == build.inputs:
        assert IMAGE_ID.read_text().strip() == build.image


def test_hadolint_is_clean_on_the_debian_python_base() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    proc = _run(str(hadolint), "deploy/image/debian-python.Dockerfile")
    assert proc.returncode == 0, proc.stdout + proc.stderr
