"""A real Prometheus server scrapes live bridges under load: the dashboard, the alert rules
and the KEDA query are checked against real data, not only parsed.

The server is built from the Go module proxy by scripts/prometheus (cached in .cache/bin,
like promtool). It listens on loopback, scrapes two bridge replicas every second with the
labels a ServiceMonitor gives them (job = the chart's Service name, namespace, pod), and
evaluates the alert rules the chart renders every second. The load makes the panels show
something: a steady stream of PDFs with a few malformed records, conversions that sometimes
fail (dead letters), a pending limit the bursts exceed (backpressure), the second replica
stopped and started again (restore, restart, the Down alert pending), and a spell of 429s.

Then, through the HTTP API: every target of every dashboard panel returns a value (range
targets over the test's window, as Grafana asks for them; instant targets now); every
variable's label_values() finds values; every alert rule loaded and evaluates with health
"ok"; the KEDA ScaledObject's query returns a number (the pending backlog).
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from service.devkit.processes import stop_process
from tests.deploy_checks import CHART, ROOT, iter_panels, load_dashboard, load_rules
from tests.fixtures.bridge import BridgeProcess, Rig, free_port, pdf_request
from tests.fixtures.emulator import EmulatorStarter
from tests.fixtures.stack import wait_for

# The first run may build prometheus (and helm) from source: 27 min on a cold Go cache on a
# loaded 2-core machine, under a minute with a warm one; the test itself takes about a minute.
pytestmark = pytest.mark.timeout(2100)

RELEASE = "rel"
NAMESPACE = "docs"
JOB = f"{RELEASE}-docutray-bridge"  # the chart's Service name: the job a ServiceMonitor sets
PODS = (f"{JOB}-0", f"{JOB}-1")
SCRAPE_S = 1
#: Range queries ask for a point every STEP_S; Grafana's $__rate_interval for that step is
#: max($__interval + scrape interval, 4 * scrape interval).
STEP_S = 2
RATE_INTERVAL = f"{max(STEP_S + SCRAPE_S, 4 * SCRAPE_S)}s"
#: The SLO the panels measure against (the dashboard's default choice).
SLO_LE = "300.0"
#: Every target must show activity (a value above 0 at some point), not only a value: a panel
#: that reads 0 here would hide a broken metric. These panels legitimately stay at 0 in this
#: setup, each for its stated reason (they must still return a finite value).
ZERO_IS_RIGHT = {
    "Limiter degraded": "Redis stays up: the limiter is never degraded",
    "Resubmissions": "no submit is in flight when a replica stops (a graceful stop drains) and "
    "DocuTray forgets no conversion",
    "Restores waiting": "no producer dies inside a transaction here (a graceful restart)",
}


# --- tools -------------------------------------------------------------------------------


@cache
def built_tool(name: str) -> str:
    """Path of a Go tool built by scripts/<name> (built once when missing)."""
    proc = subprocess.run(
        [str(ROOT / "scripts" / name), "--path"],
        capture_output=True,
        text=True,
        timeout=1900,
        check=False,
    )
    assert proc.returncode == 0, f"scripts/{name} could not build {name}:\n{proc.stderr[-3000:]}"
    return proc.stdout.strip()


def render_chart(*args: str) -> list[dict[str, Any]]:
    """`helm template` of the chart as the release `rel` in namespace `docs`."""
    proc = subprocess.run(
        [
            built_tool("helm"),
            *("template", RELEASE, str(CHART), "--namespace", NAMESPACE),
            *("--kube-version", "1.31.0", *args),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def rendered_rules() -> dict[str, Any]:
    """The `spec` of the PrometheusRule the chart renders (every alert enabled)."""
    docs = render_chart(
        "-f", str(CHART / "ci" / "default-values.yaml"), "--set", "prometheusRule.enabled=true"
    )
    (rule,) = [d for d in docs if d["kind"] == "PrometheusRule"]
    spec: dict[str, Any] = rule["spec"]
    return spec


def keda_query() -> str:
    """The Prometheus trigger's query of the ScaledObject the chart renders."""
    docs = render_chart("-f", str(CHART / "ci" / "keda-values.yaml"))
    (scaled,) = [d for d in docs if d["kind"] == "ScaledObject"]
    (trigger,) = [t for t in scaled["spec"]["triggers"] if t["type"] == "prometheus"]
    query: str = trigger["metadata"]["query"]
    return query


# --- the Prometheus server ---------------------------------------------------------------


@dataclass
class Prometheus:
    """A running Prometheus server and its HTTP API."""

    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    client: httpx.Client

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def api(self, path: str, **params: Any) -> Any:
        """GET /api/v1/<path>; the `data` of a successful answer."""
        response = self.client.get(f"{self.url}/api/v1/{path}", params=params)
        body = response.json()
        assert body.get("status") == "success", f"{path} {params}: {body}"
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """An instant query's result (a vector; a scalar becomes one sample)."""
        params: dict[str, Any] = {"query": expr}
        if at is not None:
            params["time"] = at
        data = self.api("query", **params)
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        result: list[dict[str, Any]] = data["result"]
        return result

    def query_range(self, expr: str, start: float, end: float) -> list[dict[str, Any]]:
        data = self.api("query_range", query=expr, start=start, end=end, step=STEP_S)
        result: list[dict[str, Any]] = data["result"]
        return result


def scrape_config(ports: tuple[int, int], rules_file: Path) -> dict[str, Any]:
    """Scrape both replicas as a ServiceMonitor would label them; rules every second."""
    return {
        "global": {
            "scrape_interval": f"{SCRAPE_S}s",
            "scrape_timeout": f"{SCRAPE_S}s",
            "evaluation_interval": "1s",
        },
        "rule_files": [str(rules_file)],
        "scrape_configs": [
            {
                "job_name": JOB,
                "static_configs": [
                    {
                        "targets": [f"127.0.0.1:{port}"],
                        "labels": {"namespace": NAMESPACE, "pod": pod},
                    }
                    for port, pod in zip(ports, PODS, strict=True)
                ],
            }
        ],
    }


@pytest.fixture
def start_prometheus(tmp_path: Path) -> Iterator[Callable[[dict[str, Any]], Prometheus]]:
    """`start(config) -> Prometheus`, ready; stopped (SIGTERM, then kill) at teardown."""
    started: list[Prometheus] = []

    def start(config: dict[str, Any]) -> Prometheus:
        binary = built_tool("prometheus")
        workdir = tmp_path / f"prometheus-{uuid.uuid4().hex[:6]}"
        workdir.mkdir()
        config_file = workdir / "prometheus.yml"
        config_file.write_text(yaml.safe_dump(config))
        port = free_port()
        log_path = workdir / "prometheus.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [
                    binary,
                    f"--config.file={config_file}",
                    f"--storage.tsdb.path={workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--storage.tsdb.retention.time=1h",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=workdir,
            )
        prom = Prometheus(proc, port, log_path, httpx.Client(timeout=10))
        started.append(prom)

        def ready() -> bool:
            assert proc.poll() is None, f"prometheus exited:\n{prom.log_tail()}"
            try:
                return prom.client.get(f"{prom.url}/-/ready", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, 60, interval_s=0.2, message="prometheus ready")
        return prom

    yield start
    for prom in started:
        prom.client.close()
        stop_process(prom.proc, timeout_s=15)


# --- dashboard queries -------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    panel: str
    ref: str
    expr: str
    instant: bool


def dashboard_targets() -> list[Target]:
    """Every panel target of the dashboard."""
    return [
        Target(p["title"], t["refId"], t["expr"], bool(t.get("instant")))
        for p in iter_panels(load_dashboard()["panels"])
        for t in p.get("targets", [])
    ]


def substitute(expr: str, window_s: float) -> str:
    """Grafana's variables as it would fill them in: this release, both pods, every replica."""
    values = {
        "namespace": NAMESPACE,
        "job": JOB,
        "pod": "(" + "|".join(PODS) + ")",  # a multi-value selection, formatted as a regex
        "instance": ".*",  # All
        "slo": SLO_LE,
        "__rate_interval": RATE_INTERVAL,
        "__interval": f"{STEP_S}s",
        "__range": f"{math.ceil(window_s)}s",
    }
    out = re.sub(r"\$(\w+)", lambda m: values[m.group(1)], expr)
    assert "$" not in out, out
    return out


def values_of(result: list[dict[str, Any]]) -> list[float]:
    """Every sample value of an instant or range result."""
    out: list[float] = []
    for series in result:
        samples = series.get("values") or [series["value"]]
        out.extend(float(v) for _, v in samples)
    return out


def check_targets(prom: Prometheus, start: float, targets: list[Target]) -> dict[str, str]:
    """Targets that do not show data yet: `panel/ref` -> why (empty: every one does)."""
    now = time.time()
    missing: dict[str, str] = {}
    for target in targets:
        expr = substitute(target.expr, now - start)
        instant = target.instant
        result = prom.query(expr, at=now) if instant else prom.query_range(expr, start, now)
        values = [v for v in values_of(result) if math.isfinite(v)]
        key = f"{target.panel}/{target.ref}"
        if not values:
            missing[key] = f"no finite value ({len(result)} series): {expr}"
        elif target.panel not in ZERO_IS_RIGHT and max(values) <= 0:
            missing[key] = f"only zeros: {expr}"
        else:
            SEEN[key] = max(values)
    return missing


#: The largest value each target showed (printed with -s, for the curious).
SEEN: dict[str, float] = {}


# --- the test ----------------------------------------------------------------------------


class Load:
    """Bursts of requests from a thread: PDFs plus a malformed record, every `period_s`."""

    def __init__(self, rig: Rig, burst: int, period_s: float) -> None:
        self.rig = rig
        self.burst = burst
        self.period_s = period_s
        self.sent = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="load", daemon=True)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                batch: list[dict[str, Any] | bytes] = [
                    pdf_request(f"p-{uuid.uuid4().hex[:12]}") for _ in range(self.burst)
                ]
                batch.append(b"{not json")
                self.rig.send(batch)
                self.sent += len(batch)
                self._stop.wait(self.period_s)
        except BaseException as exc:  # reported by stop()
            self.error = exc

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)
        assert not self._thread.is_alive(), "load thread did not stop"
        assert self.error is None, f"load failed: {self.error!r}"


def test_dashboard_alerts_and_keda_query_against_a_live_bridge(
    rig_factory: Callable[..., Rig],
    emulator_factory: EmulatorStarter,
    start_prometheus: Callable[[dict[str, Any]], Prometheus],
    tmp_path: Path,
) -> None:
    began = time.monotonic()
    rules_file = tmp_path / "rendered.rules.yaml"
    rules = rendered_rules()
    rules_file.write_text(yaml.safe_dump(rules))
    alert_names = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    assert alert_names == {r["alert"] for g in load_rules()["groups"] for r in g["rules"]}
    keda = keda_query()
    assert f'job="{JOB}"' in keda, keda
    assert f'namespace="{NAMESPACE}"' in keda, keda

    # Conversions take about a second; one in ten ends in ERROR (a dead letter after
    # acceptance, so the end-to-end histogram sees both outcomes).
    emulator = emulator_factory(processing_median_s=1.0, error_rate=0.1)
    rig = rig_factory(emulator, BRIDGE_MAX_PENDING="8")
    b1: BridgeProcess = rig.bridge("b1", start=False)
    b2: BridgeProcess = rig.bridge("b2", start=False)
    prom = start_prometheus(scrape_config((b1.metrics_port, b2.metrics_port), rules_file))
    window_start = time.time()

    def up(pod: str) -> float | None:
        result = prom.query(f'up{{job="{JOB}", pod="{pod}"}}')
        return float(result[0]["value"][1]) if result else None

    # Prometheus scrapes before the replica runs (up 0), then once it does (up 1): the
    # restore and every counter's rise happen in front of it.
    wait_for(lambda: up(PODS[0]) == 0, 30, message="a failed scrape of replica 0")
    b1.start()
    b1.wait_ready(90)
    wait_for(lambda: up(PODS[0]) == 1, 30, message="replica 0 scraped")

    with Load(rig, burst=12, period_s=1.5):
        wait_for(
            lambda: prom.query(f'sum(docutray_bridge_results_published_total{{job="{JOB}"}}) > 0'),
            60,
            message="results published, seen by Prometheus",
        )
        b2.start()
        b2.wait_ready(90)
        wait_for(lambda: up(PODS[1]) == 1, 30, message="replica 1 scraped")

        # The KEDA query: a number, the pending backlog of the release (not budget-bound:
        # the configured submit rate is far above what this load spends).
        def keda_number() -> bool:
            at = time.time()
            result = prom.query(keda, at=at)
            if len(result) != 1:
                return False
            pending = prom.query(
                f'sum(docutray_bridge_pending_conversions{{namespace="{NAMESPACE}",job="{JOB}"}})',
                at=at,
            )
            value = float(result[0]["value"][1])
            assert math.isfinite(value), result
            assert value >= 0, result
            assert value == float(pending[0]["value"][1])
            return True

        wait_for(keda_number, 30, message="the KEDA query returns a number")

        # Replica 1 stops (its partitions move to replica 0, which restores them) and stays
        # down long enough for DocutrayBridgeDown to go pending on its failed scrapes.
        assert b2.stop(40) == 0

        def down_pending() -> bool:
            alerts = prom.api("alerts")["alerts"]
            return any(
                a["labels"]["alertname"] == "DocutrayBridgeDown"
                and a["labels"].get("pod") == PODS[1]
                and a["state"] == "pending"
                for a in alerts
            )

        wait_for(down_pending, 30, message="DocutrayBridgeDown pending for the stopped replica")
        b2.start()  # a restart: the "Restarts" panel counts it
        b2.wait_ready(90)

        # A spell of 429s: DocuTray allows 30 calls a minute for a while.
        emulator.configure(rate_limit_per_minute=30)
        wait_for(
            lambda: prom.query(
                f'sum(increase(docutray_bridge_rate_limited_total{{job="{JOB}"}}[1m])) > 0'
            ),
            60,
            message="429s seen by Prometheus",
        )
        emulator.configure(rate_limit_per_minute=None)

        # Every panel target shows data (some need a few more scrapes).
        last: dict[str, str] = {}

        def panels_have_data() -> bool:
            nonlocal last
            last = check_targets(prom, window_start, dashboard_targets())
            return not last

        try:
            wait_for(panels_have_data, 90, interval_s=2, message="every panel shows data")
        except AssertionError:
            raise AssertionError("panels without data:\n" + json.dumps(last, indent=1)) from None

    # Dashboard variables: each label_values() finds the release's values.
    found: dict[str, list[str]] = {}
    for variable in load_dashboard()["templating"]["list"]:
        if variable["type"] != "query":
            continue
        m = re.match(r"label_values\((.*), (\w+)\)$", variable["query"]["query"])
        assert m, variable["query"]
        selector = substitute(m.group(1), 0)
        found[variable["name"]] = prom.api(f"label/{m.group(2)}/values", **{"match[]": selector})
    assert found["namespace"] == [NAMESPACE]
    assert found["job"] == [JOB]
    assert found["pod"] == list(PODS)
    assert len(found["instance"]) == 2

    # Every alert rule loaded and evaluates cleanly.
    def rules_evaluated() -> bool:
        groups = prom.api("rules", type="alert")["groups"]
        loaded = [r for g in groups for r in g["rules"]]
        assert {r["name"] for r in loaded} == alert_names
        bad = [(r["name"], r["health"], r.get("lastError")) for r in loaded if r["health"] != "ok"]
        assert not [b for b in bad if b[1] == "err"], bad
        return not bad

    wait_for(rules_evaluated, 30, message="every alert rule evaluated with health ok")

    # The exceptions name real panels, and the check tells a broken target from a good one.
    assert set(ZERO_IS_RIGHT) <= {t.panel for t in dashboard_targets()}
    broken = [
        Target("misspelt", "A", 'sum(docutray_bridge_pending_conversion{job=~"$job"})', False),
        Target("idle", "A", 'sum(docutray_bridge_limiter_degraded{job=~"$job"})', False),
        Target("fine", "A", 'sum(docutray_bridge_ready{job=~"$job"})', True),
    ]
    assert set(check_targets(prom, window_start, broken)) == {"misspelt/A", "idle/A"}
    print("\n".join(f"{k}: {v:g}" for k, v in sorted(SEEN.items())))
    print(f"prometheus live test: {time.monotonic() - began:.0f} s")
