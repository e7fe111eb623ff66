"""The deployment artefacts: Helm chart, dashboard, alert rules, Dockerfile, compose file.

Real tools, no stand-ins: `helm` and `promtool` are built from the Go module proxy
by scripts/helm and scripts/promtool (cached in .cache/bin), the chart output is
validated against Kubernetes' JSON schemas (kubernetes-validate) and, for the CRD
kinds it does not know (ServiceMonitor, PrometheusRule, ScaledObject), against
the small schemas in tests/deploy_checks.py. hadolint comes from PyPI.
"""

from __future__ import annotations

import base64
import http.server
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from service.config import SECRET_MARKERS, Settings
from tests.deploy_checks import (
    CHART,
    DASHBOARD,
    OPERATIONS_DOC,
    PROMETHEUS_OWN_SERIES,
    ROOT,
    RULES,
    dashboard_exprs,
    exported_metric_names,
    github_anchor,
    grafana_expr_as_promql,
    iter_panels,
    load_dashboard,
    load_rules,
    metrics_table_in_doc,
    metrics_table_markdown,
    promql_metric_names,
    rule_exprs,
    unknown_metrics,
    validate_crd,
)

# The first test may build helm/promtool from source (minutes when the Go cache is cold).
pytestmark = pytest.mark.timeout(900)

KUBE_VERSIONS = ("1.27.0", "1.37.0")  # the chart's kubeVersion floor, and the newest schemas
HELM_KUBE_VERSION = "1.31.0"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
RELEASE = "rel"
NAMESPACE = "docs"
FULLNAME = f"{RELEASE}-docutray-bridge"
HEADLESS = f"{FULLNAME}-headless"
# The chart's defaults plus the one required value (the API key's Secret): what render()
# uses when a test names no values file.
DEFAULT_VALUES = CHART / "ci" / "default-values.yaml"
WORKLOAD_KINDS = {"StatefulSet", "Deployment"}
ALERTS = {
    "DocutrayBridgeDown",
    "DocutrayBridgeAbsent",
    "DocutrayBridgeQuotaExhausted",
    "DocutrayBridgePageBudget80",
    "DocutrayBridgeInvalidApiKey",
    "DocutrayBridgeDeadLetterRateHigh",
    "DocutrayBridgeBacklogStuck",
    "DocutrayBridgeRateLimited",
    "DocutrayBridgeLimiterDegraded",
    "DocutrayBridgeNotReady",
    "DocutrayBridgeHeartbeatStale",
    "DocutrayBridgeOldestPendingOld",
    "DocutrayBridgeEndToEndSlow",
}
CRD_KINDS = {"ServiceMonitor", "PrometheusRule", "ScaledObject"}


# --- tools -----------------------------------------------------------------------------


@cache
def go_tool(name: str) -> str:
    """Path of a tool built by scripts/<name> (built once when missing)."""
    proc = subprocess.run(
        [str(ROOT / "scripts" / name), "--path"],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, f"scripts/{name} could not build {name}:\n{proc.stderr[-3000:]}"
    return proc.stdout.strip()


def run_tool(*args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(args), capture_output=True, text=True, timeout=timeout_s, check=False, cwd=ROOT
    )


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    return run_tool(go_tool("helm"), *args)


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return run_tool(go_tool("promtool"), *args)


@cache
def _render(values_files: tuple[str, ...], sets: tuple[str, ...]) -> tuple[str, int, str]:
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE]
    args += ["--kube-version", HELM_KUBE_VERSION]
    for f in values_files:
        args += ["-f", f]
    for s in sets:
        args += ["--set", s]
    proc = helm(*args)
    return proc.stdout, proc.returncode, proc.stderr


def render(*values_files: Path | str, sets: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """helm template → the rendered objects; fails the test when rendering fails.

    No values file: ci/default-values.yaml (a bare install fails: no API key)."""
    files = values_files or (DEFAULT_VALUES,)
    out, rc, err = _render(tuple(str(f) for f in files), sets)
    assert rc == 0, f"helm template failed:\n{err}"
    return [doc for doc in yaml.safe_load_all(out) if doc]


def render_error(*sets: str, values_file: Path | None = DEFAULT_VALUES) -> str:
    """helm template that must fail → its error text."""
    out, rc, err = _render((str(values_file),) if values_file else (), sets)
    assert rc != 0, f"helm template should have failed with {sets}, rendered:\n{out[:500]}"
    return err


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {len(found)}"
    return found[0]


def kinds(docs: list[dict[str, Any]]) -> list[str]:
    return sorted(d["kind"] for d in docs)


def workload(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """The StatefulSet (or, with workload.kind=Deployment, the Deployment)."""
    found = [d for d in docs if d["kind"] in WORKLOAD_KINDS]
    assert len(found) == 1, f"expected one workload, got {kinds(found)}"
    return found[0]


def container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    spec = workload(docs)["spec"]["template"]["spec"]
    containers: list[dict[str, Any]] = spec["containers"]
    assert len(containers) == 1
    return containers[0]


def env_of(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return {e["name"]: e for e in container(docs)["env"]}


def config_data(docs: list[dict[str, Any]]) -> dict[str, str]:
    data: dict[str, str] = one(docs, "ConfigMap", FULLNAME)["data"]
    return data


def scrape_text() -> str:
    """The service's /metrics text after init_series(), from a separate process.

    A separate process, so the gauges that init_series() resets cannot touch a bridge
    another test runs in this process.
    """
    code = (
        "import sys; from prometheus_client import generate_latest; "
        "from service import metrics; metrics.init_series(); "
        "sys.stdout.write(generate_latest().decode())"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


# --- Helm: render, lint, validate ------------------------------------------------------


@pytest.mark.parametrize("values", CI_VALUES, ids=lambda p: p.name)
def test_chart_renders_and_validates_against_kubernetes_schemas(values: Path) -> None:
    docs = render(values)
    assert len(WORKLOAD_KINDS & set(kinds(docs))) == 1
    for doc in docs:
        where = f"{values.name}: {doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] in CRD_KINDS:
            validate_crd(doc)
            continue
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                path = ".".join(str(p) for p in exc.path)
                pytest.fail(f"{where} invalid for Kubernetes {version}: {path}: {exc.message}")
        # Every object carries the standard labels.
        labels = doc["metadata"]["labels"]
        assert labels["app.kubernetes.io/instance"] == RELEASE, where
        assert labels["app.kubernetes.io/managed-by"] == "Helm", where
        assert len(doc["metadata"]["name"]) <= 63, where


@pytest.mark.parametrize("values", CI_VALUES, ids=lambda p: p.name)
def test_chart_lints(values: Path) -> None:
    proc = helm("lint", "--strict", str(CHART), "-f", str(values))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_crd_schemas_reject_a_broken_object() -> None:
    docs = render(CHART / "ci" / "monitoring-values.yaml")
    monitor = one(docs, "ServiceMonitor")
    validate_crd(monitor)
    broken = json.loads(json.dumps(monitor))
    del broken["spec"]["endpoints"][0]["port"]
    with pytest.raises(Exception, match="port"):
        validate_crd(broken)


def test_kubernetes_schema_check_catches_a_typo() -> None:
    deployment = json.loads(json.dumps(workload(render())))
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessprobe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBE_VERSIONS[-1], strict=True)


def test_fullname_is_cut_to_63_characters() -> None:
    long_name = "x" * 70
    docs = render(sets=(f"fullnameOverride={long_name}",))
    # A StatefulSet's pods carry controller-revision-hash=<name>-<10 characters>: 52 + 11.
    assert workload(docs)["metadata"]["name"] == "x" * 52
    assert one(docs, "Service", "x" * 63)
    assert one(docs, "Service", "x" * 54 + "-headless")


# --- Helm: what each option renders ----------------------------------------------------


def test_default_statefulset_is_hardened_and_probed() -> None:
    docs = render()
    assert kinds(docs) == [
        "ConfigMap",
        "ConfigMap",
        "PodDisruptionBudget",
        "Service",
        "Service",
        "ServiceAccount",
        "StatefulSet",
    ]
    sts = one(docs, "StatefulSet", FULLNAME)
    pod = sts["spec"]["template"]["spec"]
    c = container(docs)
    assert sts["spec"]["replicas"] == 2
    # Stable replica names: the pod name (release-docutray-bridge-<ordinal>) is the instance id.
    assert sts["spec"]["podManagementPolicy"] == "Parallel"
    assert sts["spec"]["serviceName"] == HEADLESS
    assert sts["spec"]["updateStrategy"] == {"type": "RollingUpdate"}
    assert "volumeClaimTemplates" not in sts["spec"]
    assert env_of(docs)["BRIDGE_INSTANCE_ID"] == {
        "name": "BRIDGE_INSTANCE_ID",
        "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}},
    }
    headless = one(docs, "Service", HEADLESS)
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is True
    assert headless["spec"]["selector"] == sts["spec"]["selector"]["matchLabels"]
    # No ports: a ServiceMonitor selecting the chart's labels never scrapes a pod twice.
    assert "ports" not in headless["spec"]
    # No service-link variables (a Service named kafka-ui would inject KAFKA_UI_*).
    assert pod["enableServiceLinks"] is False
    assert pod["terminationGracePeriodSeconds"] == 25 + 5
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert c["image"] == "ghcr.io/docutray/docutray-bridge:0.1.0"
    assert c["args"] == ["run"]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert c["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert c["ports"] == [{"name": "metrics", "containerPort": 9400, "protocol": "TCP"}]
    assert c["resources"]["limits"]["memory"]
    assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]
    assert {"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}} in pod["volumes"]
    assert env_of(docs)["TMPDIR"]["value"] == "/tmp"
    # The API key comes from the operator's Secret; no Redis configured, so no REDIS_URL.
    env = env_of(docs)
    assert env["DOCUTRAY_API_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "docutray-api",
        "key": "api-key",
    }
    assert "REDIS_URL" not in env
    assert c["envFrom"] == [{"configMapRef": {"name": FULLNAME}}]
    data = config_data(docs)
    assert data["BRIDGE_EXPECTED_REPLICAS"] == "2"
    assert data["BRIDGE_METRICS_PORT"] == "9400"
    assert data["BRIDGE_SHUTDOWN_GRACE_S"] == "25"
    # The Service selects the StatefulSet's pods on the metrics port.
    service = one(docs, "Service", FULLNAME)
    assert service["spec"]["selector"] == sts["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"
    # Drains never stall on unready pods (every pod is unready while DocuTray is down).
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"] == {
        "maxUnavailable": 1,
        "unhealthyPodEvictionPolicy": "AlwaysAllow",
        "selector": {"matchLabels": sts["spec"]["selector"]["matchLabels"]},
    }


def test_dashboard_configmap_carries_the_dashboard_for_the_sidecar() -> None:
    docs = render()
    cm = one(docs, "ConfigMap", f"{FULLNAME}-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["docutray-bridge.json"]) == load_dashboard()
    docs = render(CHART / "ci" / "monitoring-values.yaml")
    cm = one(docs, "ConfigMap", f"{FULLNAME}-dashboard")
    assert cm["metadata"]["namespace"] == "monitoring"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "Kafka"}
    off = render(sets=("dashboard.enabled=false",))
    assert [d for d in off if d["metadata"]["name"].endswith("-dashboard")] == []


def test_existing_api_key_secret_creates_no_secret() -> None:
    docs = render(CHART / "ci" / "existing-secret-values.yaml")
    assert "Secret" not in kinds(docs)
    assert "ServiceAccount" not in kinds(docs)
    env = env_of(docs)
    assert env["DOCUTRAY_API_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "docutray-api",
        "key": "api-key",
    }
    pod = workload(docs)["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "docutray-bridge"
    assert container(docs)["image"].endswith("@sha256:" + "0123456789abcdef" * 4)


def test_chart_created_secret_holds_the_api_key_and_redis_url() -> None:
    docs = render(CHART / "ci" / "redis-values.yaml")
    secret = one(docs, "Secret")
    decoded = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert decoded == {
        "DOCUTRAY_API_KEY": "dt_test_key",
        "REDIS_URL": "redis://:s3cr3t@redis-master.docs.svc:6379/0",
    }
    env = env_of(docs)
    assert env["REDIS_URL"]["valueFrom"]["secretKeyRef"] == {"name": FULLNAME, "key": "REDIS_URL"}
    # No secret leaks into the ConfigMap or the pod template.
    plain = yaml.safe_dump([config_data(docs), workload(docs)])
    assert "s3cr3t" not in plain
    assert "dt_test_key" not in plain
    assert config_data(docs)["BRIDGE_EXPECTED_REPLICAS"] == "3"


def test_redis_url_from_an_existing_secret() -> None:
    docs = render(CHART / "ci" / "redis-existing-secret-values.yaml")
    assert "Secret" not in kinds(docs)
    assert env_of(docs)["REDIS_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": "docutray-redis",
        "key": "url",
    }


def test_sasl_settings_and_credentials() -> None:
    docs = render(CHART / "ci" / "sasl-values.yaml")
    data = config_data(docs)
    assert data["KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL"
    assert data["KAFKA_SASL_MECHANISM"] == "SCRAM-SHA-512"
    assert data["KAFKA_BOOTSTRAP_SERVERS"] == "kafka-0.kafka:9093,kafka-1.kafka:9093"
    c = container(docs)
    assert c["envFrom"] == [
        {"configMapRef": {"name": FULLNAME}},
        {"secretRef": {"name": "docutray-kafka"}},
        {"secretRef": {"name": "more-kafka-settings"}},
    ]
    assert {"name": "BRIDGE_LOG_LEVEL", "value": "debug"} in c["env"]


@pytest.mark.parametrize("marker", SECRET_MARKERS)
def test_secret_looking_kafka_config_is_refused(marker: str) -> None:
    err = render_error(f"kafka.config.KAFKA_SASL_{marker.upper()}=x")
    assert "kafka.existingSecret" in err


def test_kafka_config_keys_must_be_kafka_variables() -> None:
    assert "KAFKA_" in render_error("kafka.config.SECURITY_PROTOCOL=SSL")
    assert "kafka.bootstrapServers" in render_error("kafka.config.KAFKA_BOOTSTRAP_SERVERS=x:1")


def test_service_monitor_and_prometheus_rule() -> None:
    docs = render(CHART / "ci" / "monitoring-values.yaml")
    monitor = one(docs, "ServiceMonitor")
    service = one(docs, "Service", FULLNAME)
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}

    rule = one(docs, "PrometheusRule")
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    source = {r["alert"]: r for g in load_rules()["groups"] for r in g["rules"]}
    rendered = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}
    assert set(rendered) == set(source) - {"DocutrayBridgeLimiterDegraded"}
    for name, r in rendered.items():
        want = dict(source[name])
        want["labels"] = {**source[name]["labels"], "team": "docs-platform"}
        # Rules that pick bridge jobs by name also pick this release's Service.
        want["expr"] = want["expr"].replace(
            ".*docutray-bridge.*", f".*docutray-bridge.*|{FULLNAME}"
        )
        assert r == want, name
    assert (
        f'up{{job=~".*docutray-bridge.*|{FULLNAME}"}} == 0'
        in rendered["DocutrayBridgeDown"]["expr"]
    )


def test_prometheus_rule_thresholds_come_from_values() -> None:
    """The SLO and oldest-pending thresholds: the source file's literals, or the values'."""
    source = {r["alert"]: r["expr"] for g in load_rules()["groups"] for r in g["rules"]}
    for sets, slo, age in (
        (("prometheusRule.enabled=true",), "300", "1800"),
        (
            (
                "prometheusRule.enabled=true",
                "prometheusRule.endToEndSloSeconds=60",
                "prometheusRule.oldestPendingAgeSeconds=900",
            ),
            "60",
            "900",
        ),
    ):
        rule = one(render(sets=sets), "PrometheusRule")
        rendered = {r["alert"]: r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]}
        slow = rendered["DocutrayBridgeEndToEndSlow"]
        assert f") > {slo}\n" in slow, slow
        assert slow.replace(f") > {slo}\n", ") > 300\n") == source["DocutrayBridgeEndToEndSlow"]
        old = rendered["DocutrayBridgeOldestPendingOld"]
        assert old.replace(f"> {age}\n", "> 1800\n") == source["DocutrayBridgeOldestPendingOld"]
        assert f"> {age}\n" in old, old
    # The SLO is a bucket bound of the histogram, so the dashboard's share panels can use it.
    assert "must be one of" in render_error("prometheusRule.endToEndSloSeconds=250")


def test_prometheus_rule_keeps_rule_severity_over_extra_labels() -> None:
    docs = render(
        sets=("prometheusRule.enabled=true", "prometheusRule.additionalRuleLabels.severity=page")
    )
    rules = [r for g in one(docs, "PrometheusRule")["spec"]["groups"] for r in g["rules"]]
    assert {r["labels"]["severity"] for r in rules} == {"warning", "critical"}


def test_hpa_scales_the_statefulset() -> None:
    docs = render(CHART / "ci" / "hpa-values.yaml")
    hpa = one(docs, "HorizontalPodAutoscaler")
    sts = one(docs, "StatefulSet")
    assert "replicas" not in sts["spec"]
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "name": sts["metadata"]["name"],
    }
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 12)
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu", "memory"]
    # Autoscaled: each replica's fallback share assumes the most replicas.
    assert config_data(docs)["BRIDGE_EXPECTED_REPLICAS"] == "12"
    assert "ScaledObject" not in kinds(docs)


def test_keda_scales_on_lag_and_pending_backlog() -> None:
    docs = render(CHART / "ci" / "keda-values.yaml")
    scaled = one(docs, "ScaledObject")
    assert "replicas" not in one(docs, "StatefulSet")["spec"]
    assert "HorizontalPodAutoscaler" not in kinds(docs)
    spec = scaled["spec"]
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (1, 8)
    assert spec["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "name": FULLNAME,
    }
    triggers = {t["type"]: t for t in spec["triggers"]}
    assert set(triggers) == {"kafka", "prometheus"}
    kafka = triggers["kafka"]["metadata"]
    assert kafka["topic"] == "docs.requests"
    assert kafka["consumerGroup"] == "docs-bridge"
    assert kafka["lagThreshold"] == "50"
    assert kafka["allowIdleConsumers"] == "false"
    assert triggers["kafka"]["authenticationRef"] == {"name": "docutray-kafka-auth"}
    query = triggers["prometheus"]["metadata"]["query"]
    sel = f'namespace="{NAMESPACE}",job="{FULLNAME}"'
    assert query.startswith(f"sum(docutray_bridge_pending_conversions{{{sel}}}) unless on ()")
    assert triggers["prometheus"]["metadata"]["threshold"] == "100"
    assert triggers["prometheus"]["metadata"]["ignoreNullValues"] == "true"
    assert unknown_metrics([query], scrape_text()) == set()
    # Status calls spend the submit budget too when it is shared.
    assert "status_calls_total" not in query
    shared = render(CHART / "ci" / "keda-values.yaml", sets=("settings.BRIDGE_SHARED_BUDGET=true",))
    shared_query = next(
        t for t in one(shared, "ScaledObject")["spec"]["triggers"] if t["type"] == "prometheus"
    )["metadata"]["query"]
    assert "docutray_bridge_status_calls_total" in shared_query
    no_lag = render(CHART / "ci" / "keda-values.yaml", sets=("autoscaling.keda.lagTrigger=false",))
    assert [t["type"] for t in one(no_lag, "ScaledObject")["spec"]["triggers"]] == ["prometheus"]


def test_keda_pending_query_ignores_a_backlog_that_only_reflects_the_budget(
    tmp_path: Path,
) -> None:
    """promtool evaluates the rendered query: 500 pending while the deployment spends its whole
    submit budget reads as nothing (more replicas would not convert faster); the same backlog
    while the budget has room reads as 500."""
    keda = one(render(CHART / "ci" / "keda-values.yaml"), "ScaledObject")
    query = next(t for t in keda["spec"]["triggers"] if t["type"] == "prometheus")["metadata"][
        "query"
    ]
    labels = f'namespace="{NAMESPACE}", job="{FULLNAME}", instance="a"'

    def case(submissions_per_min: int, expect: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "interval": "1m",
            "input_series": [
                {
                    "series": f'docutray_bridge_pending_conversions{{{labels}, state="queued"}}',
                    "values": "500x30",
                },
                {
                    "series": f'docutray_bridge_submissions_total{{{labels}, outcome="accepted",'
                    ' status_class="2xx"}',
                    "values": f"0+{submissions_per_min}x30",
                },
                {
                    "series": "docutray_bridge_limiter_effective_rate_per_second"
                    f'{{{labels}, budget="submit"}}',
                    "values": "1x30",
                },
                # Another release's backlog is not this one's.
                {
                    "series": 'docutray_bridge_pending_conversions{namespace="other", '
                    'job="x", instance="b", state="queued"}',
                    "values": "900x30",
                },
            ],
            "promql_expr_test": [{"expr": query, "eval_time": "20m", "exp_samples": expect}],
        }

    tests = {
        "rule_files": [],
        "evaluation_interval": "1m",
        "tests": [
            case(60, []),  # 1 submission/s of a 1/s budget: budget-bound
            case(12, [{"labels": "{}", "value": 500}]),  # 0.2/s: room left, scale on it
        ],
    }
    path = tmp_path / "keda.test.yaml"
    path.write_text(yaml.safe_dump(tests))
    proc = promtool("test", "rules", str(path))
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (
            ("autoscaling.enabled=true", "autoscaling.maxReplicas=7"),
            "autoscaling.maxReplicas (7) is more than kafka.inputPartitions (6)",
        ),
        (
            ("autoscaling.enabled=true", "autoscaling.type=keda", "autoscaling.maxReplicas=12"),
            "autoscaling.maxReplicas (12) is more than kafka.inputPartitions (6)",
        ),
        (("replicaCount=7",), "replicaCount (7) is more than kafka.inputPartitions (6)"),
        (
            ("autoscaling.enabled=true", "autoscaling.minReplicas=5", "autoscaling.maxReplicas=3"),
            "minReplicas is more than",
        ),
        # values.schema.json refuses it before the template's own check does.
        (("autoscaling.enabled=true", "autoscaling.type=vpa"), "one of 'hpa', 'keda'"),
        (("docutray.apiKey=k", "docutray.existingSecret=s"), "not both"),
    ],
)
def test_rendering_fails_on_impossible_values(sets: tuple[str, ...], message: str) -> None:
    assert message in render_error(*sets)


def test_more_replicas_than_partitions_when_allowed() -> None:
    docs = render(CHART / "ci" / "standby-replicas-values.yaml")
    assert workload(docs)["spec"]["replicas"] == 4
    assert one(docs, "PodDisruptionBudget")["spec"]["minAvailable"] == 2
    allowed = render(
        sets=(
            "autoscaling.enabled=true",
            "autoscaling.type=keda",
            "autoscaling.maxReplicas=12",
            "autoscaling.allowMoreReplicasThanPartitions=true",
        )
    )
    kafka = next(
        t for t in one(allowed, "ScaledObject")["spec"]["triggers"] if t["type"] == "kafka"
    )
    assert kafka["metadata"]["allowIdleConsumers"] == "true"
    # As many replicas as partitions is fine without the switch.
    render(sets=("autoscaling.enabled=true", "autoscaling.maxReplicas=6"))


def _notes(tmp_path: Path, *values_files: Path) -> str:
    """NOTES.txt as `helm install` would print it (helm template skips NOTES, so the
    test renders a copy of the chart with NOTES wrapped in a YAML document)."""
    chart = tmp_path / "chart"
    shutil.copytree(CHART, chart)
    lines = (CHART / "templates" / "NOTES.txt").read_text().splitlines(keepends=True)
    wrapped = "notes: |\n" + "".join("  " + line for line in lines)
    (chart / "templates" / "notes-check.yaml").write_text(wrapped)
    args = ["template", RELEASE, str(chart), "-n", NAMESPACE]
    args += ["--kube-version", HELM_KUBE_VERSION, "--show-only", "templates/notes-check.yaml"]
    for f in values_files or (DEFAULT_VALUES,):
        args += ["-f", str(f)]
    proc = helm(*args)
    assert proc.returncode == 0, proc.stderr
    notes: str = yaml.safe_load(proc.stdout)["notes"]
    return notes


def test_install_notes_warn_about_redis_and_a_deployment(tmp_path: Path) -> None:
    notes = _notes(tmp_path)
    assert f"port-forward svc/{FULLNAME} 9400" in notes
    assert "2 replicas without Redis" in notes
    assert "workload.kind=Deployment" not in notes
    configured = _notes(tmp_path / "b", CHART / "ci" / "redis-values.yaml")
    assert "NOTE" not in configured
    deployment = _notes(tmp_path / "c", CHART / "ci" / "deployment-values.yaml")
    assert "NOTE: workload.kind=Deployment" in deployment
    assert "without Redis" not in deployment


# --- Helm: real clusters (required key, schema, StatefulSet/Deployment, secrets, files) -


def test_install_without_an_api_key_fails_at_render_time() -> None:
    err = render_error(values_file=None)
    assert "a DocuTray API key is required: set docutray.existingSecret" in err
    # One line of explanation, not a template dump.
    assert len([line for line in err.splitlines() if line.strip()]) <= 2, err


@pytest.mark.parametrize(
    ("sets", "where"),
    [
        (("replicaCont=3",), "'replicaCont' not allowed"),
        (("redis.passwordSecret.nmae=x",), "'nmae' not allowed"),
        (("settings.BRIDGE_MAX_PENDNG=5",), "'BRIDGE_MAX_PENDNG' not allowed"),
        (("workload.kind=DaemonSet",), "workload"),
        (("kafka.inputPartitions=zero",), "inputPartitions"),
        (("extraVolumeMounts[0].name=ca",), "mountPath"),
    ],
)
def test_values_schema_refuses_a_misspelt_or_wrong_value(sets: tuple[str, ...], where: str) -> None:
    err = render_error(*sets)
    assert "values don't meet the specifications of the schema" in err
    assert where in err


def test_values_schema_declares_every_value_and_setting() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    def undeclared(vals: dict[str, Any], sch: dict[str, Any], path: str) -> list[str]:
        out = []
        for key, value in vals.items():
            prop = sch.get("properties", {}).get(key)
            if prop is None:
                out.append(path + key)
            elif isinstance(value, dict) and "properties" in prop:
                out += undeclared(value, prop, f"{path}{key}.")
        return out

    assert undeclared(values, schema, "") == []
    # `settings` is closed: its names are the ones values.yaml lists (every bridge setting).
    assert set(schema["properties"]["settings"]["properties"]) == set(values["settings"]), (
        "values.schema.json settings differ from values.yaml settings"
    )


def test_deployment_kind_keeps_working() -> None:
    docs = render(CHART / "ci" / "deployment-values.yaml")
    deployment = one(docs, "Deployment", FULLNAME)
    assert "StatefulSet" not in kinds(docs)
    assert [d for d in docs if d["metadata"]["name"] == HEADLESS] == []
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    assert one(docs, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": FULLNAME,
    }
    assert env_of(docs)["BRIDGE_INSTANCE_ID"]["valueFrom"] == {
        "fieldRef": {"fieldPath": "metadata.name"}
    }
    assert deployment["spec"]["template"]["spec"]["enableServiceLinks"] is False


def _expanded(env: list[dict[str, Any]], name: str, values: dict[str, str]) -> str:
    """A variable's value after Kubernetes' $(VAR) expansion (variables defined before it)."""
    names = [e["name"] for e in env]
    value = str(env[names.index(name)]["value"])
    for earlier in names[: names.index(name)]:
        value = value.replace(f"$({earlier})", values.get(earlier, f"$({earlier})"))
    return value


@pytest.mark.parametrize(
    ("values", "url"),
    [
        ("strimzi-values.yaml", "redis://:{pw}@docutray-redis-master.redis.svc:6379/0"),
        (
            "deployment-values.yaml",
            "rediss://:{pw}@docutray-redis-master.redis.svc:6379/0"
            "?ssl_ca_certs=/etc/redis-ca/ca.crt",
        ),
    ],
)
def test_redis_password_from_an_existing_secret_key(values: str, url: str) -> None:
    """Bitnami's Secret holds only `redis-password`: the pod completes REDIS_URL with it."""
    from redis.asyncio import Redis

    docs = render(CHART / "ci" / values)
    env = container(docs)["env"]
    names = [e["name"] for e in env]
    assert names.index("REDIS_PASSWORD") < names.index("REDIS_URL")
    assert env[names.index("REDIS_PASSWORD")]["valueFrom"]["secretKeyRef"] == {
        "name": "docutray-redis",
        "key": "redis-password",
    }
    assert "Secret" not in kinds(docs)  # no copy of any password in the chart's objects
    password = "Xy7pQ2mN9aBc"  # Bitnami-style: alphanumeric
    expanded = _expanded(env, "REDIS_URL", {"REDIS_PASSWORD": password})
    assert expanded == url.format(pw=password)
    settings = Settings(REDIS_URL=expanded)  # type: ignore[call-arg]
    assert settings.redis == expanded
    client = Redis.from_url(expanded)
    assert client.connection_pool.connection_kwargs["password"] == password


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (("redis.passwordSecret.name=r",), "redis.passwordSecret needs redis.url"),
        (
            ("redis.passwordSecret.name=r", "redis.url=redis://:pw@h:6379/0"),
            "without a user or password",
        ),
        (
            ("redis.passwordSecret.name=r", "redis.url=redis://h:6379", "redis.existingSecret=s"),
            "not both",
        ),
    ],
)
def test_redis_password_secret_misuse_fails(sets: tuple[str, ...], message: str) -> None:
    assert message in render_error(*sets)


def test_extra_env_value_from_and_extra_volumes_for_strimzi() -> None:
    docs = render(CHART / "ci" / "strimzi-values.yaml")
    c = container(docs)
    pod = one(docs, "StatefulSet")["spec"]["template"]["spec"]
    assert env_of(docs)["KAFKA_SASL_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "docutray-bridge",
        "key": "password",
    }
    assert {"name": "kafka-ca", "mountPath": "/etc/kafka-ca", "readOnly": True} in c["volumeMounts"]
    assert {
        "name": "kafka-ca",
        "secret": {
            "secretName": "my-cluster-cluster-ca-cert",
            "items": [{"key": "ca.crt", "path": "ca.crt"}],
        },
    } in pod["volumes"]
    # The CA file the bridge is told about is the one mounted.
    assert config_data(docs)["KAFKA_SSL_CA_LOCATION"] == "/etc/kafka-ca/ca.crt"
    # The password never lands in the ConfigMap.
    assert "KAFKA_SASL_PASSWORD" not in config_data(docs)


EXAMPLES = ("strimzi-values.yaml", "confluent-cloud-values.yaml", "msk-values.yaml")


@pytest.mark.parametrize("values", EXAMPLES)
def test_cluster_examples_use_sasl_ssl_and_only_librdkafka_properties(values: str) -> None:
    """Every KAFKA_* variable an example sets is one the bridge accepts at start-up."""
    from service.config import check_kafka_passthrough

    docs = render(CHART / "ci" / values)
    data = config_data(docs)
    assert data["KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL"
    assert data["KAFKA_SASL_MECHANISM"] in {"SCRAM-SHA-512", "PLAIN"}
    env = {k: v for k, v in data.items() if k.startswith("KAFKA_")}
    # The credentials, as their Secrets give them at run time.
    env["KAFKA_SASL_USERNAME"] = env.get("KAFKA_SASL_USERNAME", "user")
    env["KAFKA_SASL_PASSWORD"] = "from-a-secret"
    check_kafka_passthrough(env)
    c = container(docs)
    from_secrets = {e["name"] for e in c["env"] if "valueFrom" in e}
    from_secrets |= (
        {"KAFKA_SASL_USERNAME", "KAFKA_SASL_PASSWORD"} if len(c["envFrom"]) > 1 else set()
    )
    assert "KAFKA_SASL_PASSWORD" in from_secrets


def test_msk_example_says_iam_is_not_supported() -> None:
    text = (CHART / "ci" / "msk-values.yaml").read_text()
    assert "IAM" in text
    assert "NOT supported" in text


def test_runbook_url_base_is_configurable() -> None:
    docs = render(
        sets=(
            "prometheusRule.enabled=true",
            "prometheusRule.runbookUrlBase=https://wiki.example.com/ops/docutray-bridge/",
        )
    )
    rules = [r for g in one(docs, "PrometheusRule")["spec"]["groups"] for r in g["rules"]]
    assert {r["annotations"]["runbook_url"] for r in rules} == {
        f"https://wiki.example.com/ops/docutray-bridge#runbook-{r['alert'].lower()}" for r in rules
    }


# --- Helm: the ConfigMap and the bridge's settings agree -------------------------------


def _aliases() -> dict[str, str]:
    """Environment variable (first alias) → Settings field name."""
    out: dict[str, str] = {}
    for field, info in Settings.model_fields.items():
        alias = info.validation_alias
        first = alias.choices[0] if alias is not None and hasattr(alias, "choices") else field
        out[str(first)] = field
    return out


def test_every_setting_of_the_bridge_is_in_the_chart() -> None:
    data = config_data(render())
    from_secrets_or_pod = {"DOCUTRAY_API_KEY", "REDIS_URL", "BRIDGE_INSTANCE_ID"}
    assert set(data) | from_secrets_or_pod == set(_aliases())


def test_chart_defaults_equal_the_bridge_defaults() -> None:
    """values.yaml repeats the bridge's defaults; a change on one side fails here."""
    data = config_data(render())
    parsed = Settings(**data)  # type: ignore[arg-type]
    intended = {
        "BRIDGE_TOPIC_REPLICATION_FACTOR": 3,
        "BRIDGE_LOG_FORMAT": "json",
        "BRIDGE_EXPECTED_REPLICAS": 2,
        "KAFKA_BOOTSTRAP_SERVERS": "kafka:9092",
        "BRIDGE_MEMORY_BUDGET_MB": 1024,  # the container's memory limit, 1Gi
    }
    for variable, field in _aliases().items():
        if variable not in data:
            continue
        value = getattr(parsed, field)
        value = value.get_secret_value() if hasattr(value, "get_secret_value") else value
        want = intended.get(variable, Settings.model_fields[field].default)
        assert value == want, f"{variable}: chart renders {value!r}, bridge default {want!r}"


def test_overridden_settings_render_as_the_bridge_reads_them() -> None:
    docs = render(CHART / "ci" / "settings-values.yaml")
    data = config_data(docs)
    assert "BRIDGE_LOG_LEVEL" not in data  # null: left to the bridge's default
    parsed = Settings(**data)  # type: ignore[arg-type]
    assert parsed.max_request_bytes == 33554432
    assert parsed.max_document_bytes == 209715200
    assert parsed.poll_first_quantile == 0.75
    assert parsed.fetch_mode is True
    assert parsed.shared_budget is True
    assert parsed.changelog == "docs.pending"
    assert parsed.shutdown_grace_s == 42.5
    assert parsed.metrics_port == 9500
    assert parsed.expected_replicas == 5
    pod = workload(docs)["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 43 + 5
    assert container(docs)["ports"][0]["containerPort"] == 9500
    assert one(docs, "Service", FULLNAME)["spec"]["ports"][0]["port"] == 9500


def test_chart_version_matches_the_package() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    pyproject = (ROOT / "pyproject.toml").read_text()
    version = re.search(r'^version = "([^"]+)"', pyproject, re.M)
    assert version is not None
    assert chart["appVersion"] == version.group(1)


def test_every_value_is_commented() -> None:
    """Each value in values.yaml has a comment just above it, or sits inside a commented
    value (e.g. the fields of `resources`); bare section headers need none."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    uncommented = []
    ancestors: list[tuple[int, bool]] = []  # (indent, commented) of enclosing keys
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)([A-Za-z_][\w.]*):", line)
        if not m:
            continue
        indent = len(m.group(1))
        while ancestors and ancestors[-1][0] >= indent:
            ancestors.pop()
        commented = i > 0 and lines[i - 1].strip().startswith("#")
        is_section = line.rstrip().endswith(":")
        if not (commented or is_section or any(c for _, c in ancestors)):
            uncommented.append(line.strip())
        ancestors.append((indent, commented))
    assert uncommented == []


# --- dashboard and alert rules ---------------------------------------------------------


def _load_builder() -> ModuleType:
    path = ROOT / "deploy" / "grafana" / "build_dashboard.py"
    spec = importlib.util.spec_from_file_location("build_dashboard", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["build_dashboard"] = module
    spec.loader.exec_module(module)
    return module


def test_dashboard_json_is_generated_from_its_source() -> None:
    builder = _load_builder()
    assert DASHBOARD.read_text(encoding="utf-8") == builder.render(), (
        "stale dashboard: run .venv/bin/python deploy/grafana/build_dashboard.py"
    )


def test_dashboard_structure() -> None:
    dashboard = load_dashboard()
    assert dashboard["uid"] == "docutray-bridge"
    assert [i["name"] for i in dashboard["__inputs"]] == ["DS_PROMETHEUS"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    panels = [p for p in iter_panels(dashboard["panels"])]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for p in panels:
        grid = p["gridPos"]
        assert grid["x"] + grid["w"] <= 24, p["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps another panel"
                cells.add((x, y))
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == "${DS_PROMETHEUS}", p["title"]
        assert p["targets"], p["title"]
        assert p.get("description"), p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${DS_PROMETHEUS}"
            assert 'namespace=~"$namespace"' in t["expr"], t["expr"]
    # What operators asked for: each of these shows somewhere.
    used = set().union(*(promql_metric_names(e) for e in dashboard_exprs(dashboard)))
    for metric in (
        "docutray_bridge_requests_consumed_total",
        "docutray_bridge_results_published_total",
        "docutray_bridge_dead_letters_total",
        "docutray_bridge_pending_conversions",
        "docutray_bridge_consumer_lag",
        "docutray_bridge_http_request_duration_seconds_bucket",
        "docutray_bridge_rate_limited_total",
        "docutray_bridge_limiter_effective_rate_per_second",
        "docutray_bridge_limiter_configured_rate_per_second",
        "docutray_bridge_submissions_total",
        "docutray_bridge_status_calls_total",
        "docutray_bridge_status_calls_per_conversion_count",
        "docutray_bridge_transactions_total",
        "docutray_bridge_ready",
        "docutray_bridge_consumption_paused",
        "docutray_bridge_limiter_degraded",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_start_time_seconds",
        "docutray_bridge_end_to_end_seconds_bucket",
        "docutray_bridge_end_to_end_seconds_count",
        "docutray_bridge_oldest_pending_age_seconds",
        "docutray_bridge_memory_held_bytes",
        "docutray_bridge_restore_waiting_partitions",
    ):
        assert metric in used, metric
    # A pod variable (ServiceMonitor scrapes label targets with `pod`) that every query honours.
    assert variables["pod"]["allValue"] == ".*"
    for p in panels:
        for t in p.get("targets", []):
            assert 'pod=~"$pod"' in t["expr"], t["expr"]


def test_dashboard_and_rules_use_only_exported_metrics() -> None:
    exprs = dashboard_exprs(load_dashboard()) + rule_exprs(load_rules())
    scrape = scrape_text()
    # `up` is the series Prometheus writes for every scrape target (the bridge cannot
    # export it: it is what says the bridge did not answer): unknown_metrics knows it.
    assert "up" in PROMETHEUS_OWN_SERIES
    assert unknown_metrics(exprs, scrape) == set()
    used = set().union(*(promql_metric_names(e) for e in exprs))
    assert len(used) >= 20
    # The bridge's own metrics, its process collector's, and Prometheus' own `up`.
    assert all(n.startswith(("docutray_bridge_", "process_")) or n == "up" for n in used), used


def test_unknown_metrics_flags_a_metric_the_service_does_not_export() -> None:
    scrape = scrape_text()
    exprs = [
        "sum(rate(docutray_bridge_results_published_total[5m]))",
        "docutray_bridge_http_request_duration_seconds",  # a histogram has no bare series
        'rate(docutray_bridge_made_up_total{job=~"$job"}[$__rate_interval])',
    ]
    assert unknown_metrics(exprs, scrape) == {
        "docutray_bridge_http_request_duration_seconds",
        "docutray_bridge_made_up_total",
    }


def test_exported_names_include_declared_families_without_samples() -> None:
    names = exported_metric_names(scrape_text())
    # Labelled, never observed yet: only the # TYPE line is there.
    assert "docutray_bridge_consumer_lag" in names
    assert "docutray_bridge_conversion_duration_seconds_bucket" in names
    assert "docutray_bridge_build_info" in names
    assert "docutray_bridge_requests_consumed_total" in names


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ("up", {"up"}),
        ('sum by (job, le) (rate(a_bucket{job="x",le!="+Inf"}[5m]))', {"a_bucket"}),
        ("histogram_quantile(0.95, sum without (instance) (rate(b_bucket[1m])))", {"b_bucket"}),
        ("a / on(job) group_left(version) c_info", {"a", "c_info"}),
        ("rate(x_total[5m] offset 1h) > bool 1e-3", {"x_total"}),
        ('{__name__="named_metric", job="j"}', {"named_metric"}),
        ("time() - hb_seconds > 120 and ignoring(reason) p == 1", {"hb_seconds", "p"}),
        ('max_over_time(m:rate5m{a="sum(fake)"}[1h:5m])', {"m:rate5m"}),
        ('sum(rate(q{namespace=~"$namespace"}[$__rate_interval]))', {"q"}),
        ("abs(-v) unless w or z", {"v", "w", "z"}),
        ("count(x) by (instance)", {"x"}),
        ("0x1f + 12 * .5", set()),
    ],
)
def test_promql_metric_names(expr: str, names: set[str]) -> None:
    assert promql_metric_names(expr) == names


def test_dashboard_variable_queries_are_checked() -> None:
    dashboard = {
        "panels": [{"type": "row", "panels": [{"targets": [{"expr": "nested_metric"}]}]}],
        "templating": {
            "list": [
                {"type": "query", "query": {"query": 'label_values(var_metric{a="1"}, job)'}},
                {"type": "query", "query": "label_values(job)"},
                {"type": "datasource", "query": "prometheus"},
            ]
        },
    }
    assert dashboard_exprs(dashboard) == ["nested_metric", 'var_metric{a="1"}']


def test_promql_syntax_of_dashboard_rules_and_keda_query(tmp_path: Path) -> None:
    """promtool parses every expression (the dashboard's after Grafana's variables)."""
    keda = one(render(CHART / "ci" / "keda-values.yaml"), "ScaledObject")
    query = next(t for t in keda["spec"]["triggers"] if t["type"] == "prometheus")
    exprs = [grafana_expr_as_promql(e) for e in dashboard_exprs(load_dashboard())]
    exprs.append(query["metadata"]["query"])
    recording = {
        "groups": [
            {
                "name": "dashboard-syntax",
                "rules": [{"record": f"check:expr_{i}", "expr": e} for i, e in enumerate(exprs)],
            }
        ]
    }
    path = tmp_path / "dashboard.rules.yaml"
    path.write_text(yaml.safe_dump(recording))
    proc = promtool("check", "rules", str(path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # And the check can fail.
    path.write_text(
        yaml.safe_dump(
            {
                "groups": [
                    {"name": "bad", "rules": [{"record": "check:bad", "expr": "sum(rate(x[5m])"}]}
                ]
            }
        )
    )
    assert promtool("check", "rules", str(path)).returncode != 0


def test_alert_rules_pass_promtool_check(tmp_path: Path) -> None:
    proc = promtool("check", "rules", str(RULES))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{len(ALERTS)} rules found" in proc.stdout
    # The PrometheusRule the chart renders is just as valid.
    rule = one(render(CHART / "ci" / "monitoring-values.yaml"), "PrometheusRule")
    path = tmp_path / "rendered.rules.yaml"
    path.write_text(yaml.safe_dump(rule["spec"]))
    proc = promtool("check", "rules", str(path))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_alert_rules_unit_tests() -> None:
    """Each alert fires on its scenario and stays quiet on a healthy look-alike."""
    proc = promtool("test", "rules", "deploy/prometheus/docutray-bridge.rules.test.yaml")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    tested = set(
        re.findall(
            r"alertname: (\w+)",
            (ROOT / "deploy/prometheus").joinpath("docutray-bridge.rules.test.yaml").read_text(),
        )
    )
    assert tested == ALERTS


def test_alerts_have_runbooks_and_summaries() -> None:
    rules = [r for g in load_rules()["groups"] for r in g["rules"]]
    assert {r["alert"] for r in rules} == ALERTS
    doc = OPERATIONS_DOC.read_text(encoding="utf-8")
    anchors = {github_anchor(h) for h in re.findall(r"^#+ (.+)$", doc, re.M)}
    for r in rules:
        name = r["alert"]
        assert r["labels"]["severity"] in {"warning", "critical"}, name
        assert r["annotations"]["summary"], name
        assert r["annotations"]["description"], name
        url = r["annotations"]["runbook_url"]
        anchor = f"runbook-{name.lower()}"
        assert url == f"https://github.com/docutray/docutray-bridge#{anchor}", name
        assert anchor in anchors, f"README.md has no section for {name}"
    assert "runbook" in anchors  # the dashboard links there


def test_metrics_table_is_current() -> None:
    doc = OPERATIONS_DOC.read_text(encoding="utf-8")
    assert metrics_table_in_doc(doc) == metrics_table_markdown(), (
        "stale metrics table: run .venv/bin/python -m tests.deploy_checks --write-metrics-table"
    )


# --- container -------------------------------------------------------------------------


def _dockerfile_stages() -> list[list[str]]:
    """Dockerfile instructions (continuations joined), split by FROM."""
    text = (ROOT / "Dockerfile").read_text()
    joined = re.sub(r"\\\n", " ", text)
    stages: list[list[str]] = []
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            stages.append([])
        elif not stages:
            continue  # the global ARGs before the first FROM (BASE_IMAGE)
        stages[-1].append(line)
    return stages


def test_hadolint_is_clean() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    proc = run_tool(str(hadolint), "Dockerfile")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_conventions() -> None:
    stages = _dockerfile_stages()
    assert len(stages) == 2
    builder, final = stages
    # Both stages on one base, ARG BASE_IMAGE; its default is the pinned official image.
    default = re.search(r"(?m)^ARG BASE_IMAGE=(\S+)$", (ROOT / "Dockerfile").read_text())
    assert default, "no ARG BASE_IMAGE default"
    assert re.match(r"^python:3\.11\.\d+-slim-bookworm@sha256:[0-9a-f]{64}$", default[1])
    assert builder[0] == "FROM ${BASE_IMAGE} AS builder"
    assert final[0] == "FROM ${BASE_IMAGE}"
    joined = "\n".join(final)
    assert "USER 10001:10001" in final
    assert 'ENTRYPOINT ["docutray-bridge"]' in final
    assert 'CMD ["run"]' in final
    assert any(i.startswith("HEALTHCHECK ") and "/healthz" in i for i in final)
    copies = [i for i in final if i.startswith("COPY")]
    assert copies == ["COPY --from=builder /opt/venv /opt/venv"]
    for tool in ("apt-get install", "gcc", "build-essential", "pip install"):
        assert tool not in joined, tool


def _healthcheck_argv() -> list[str]:
    final = _dockerfile_stages()[-1]
    line = next(i for i in final if i.startswith("HEALTHCHECK "))
    argv: list[str] = json.loads(line[line.index("CMD ") + 4 :])
    return argv


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        code = self.status if self.path == "/healthz" else 404
        self.send_response(code)
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[http.server.HTTPServer]:
    server = http.server.HTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_dockerfile_healthcheck_command_tells_healthy_from_not(
    health_server: http.server.HTTPServer,
) -> None:
    argv = _healthcheck_argv()
    assert argv[0] == "python"
    argv[0] = sys.executable
    env = {**os.environ, "BRIDGE_METRICS_PORT": str(health_server.server_address[1])}
    _Health.status = 200
    assert subprocess.run(argv, env=env, timeout=30, capture_output=True).returncode == 0
    _Health.status = 503
    assert subprocess.run(argv, env=env, timeout=30, capture_output=True).returncode != 0


def test_dockerignore_lets_the_build_inputs_through() -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    assert "*" in lines
    for needed in ("!pyproject.toml", "!README.md", "!constraints.txt", "!service/"):
        assert needed in lines


def test_entrypoint_runs_from_a_clean_install_of_the_wheel(tmp_path: Path) -> None:
    """What the image's builder stage does: build the wheel, install it in a fresh venv."""
    wheels = tmp_path / "wheels"
    proc = run_tool(
        str(Path(sys.executable).parent / "pip"),
        "wheel",
        "--no-deps",
        "--quiet",
        ".",
        "-w",
        str(wheels),
        timeout_s=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = wheels.glob("docutray_bridge-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    install = [str(venv / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check"]
    install += ["--only-binary=:all:"]
    if (ROOT / "constraints.txt").exists():
        install += ["--constraint", str(ROOT / "constraints.txt")]
    proc = run_tool(*install, str(wheel), timeout_s=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    entry = str(venv / "bin" / "docutray-bridge")
    # Run away from the source tree so the installed package, not ./service, is imported.
    for args, expect in ((["--help"], "run"), (["run", "--help"], "Usage")):
        proc = subprocess.run(
            [entry, *args], capture_output=True, text=True, timeout=60, cwd=tmp_path
        )
        assert proc.returncode == 0, proc.stderr
        assert expect in proc.stdout
    shutil.rmtree(venv)


# --- compose ---------------------------------------------------------------------------


@cache
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def test_compose_services_and_images() -> None:
    services = compose()["services"]
    assert set(services) == {"kafka", "redis", "emulator", "bridge", "prometheus", "grafana"}
    for name, svc in services.items():
        if "build" in svc:
            assert svc["build"] == "."
            continue
        image = svc["image"]
        assert re.match(r"^[\w./-]+:v?\d+\.\d+(\.\d+)?(-[\w.]+)?$", image), f"{name}: {image}"
    for name, svc in services.items():
        for dep in svc.get("depends_on", []):
            assert dep in services, f"{name} depends on unknown {dep}"
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"


def test_compose_mounts_exist() -> None:
    for name, svc in compose()["services"].items():
        for volume in svc.get("volumes", []):
            source = volume.split(":", 1)[0]
            assert source.startswith("./"), f"{name}: {volume}"
            assert (ROOT / source).exists(), f"{name}: {source} does not exist"


def test_compose_bridge_is_wired_to_its_neighbours() -> None:
    services = compose()["services"]
    bridge = services["bridge"]
    env = _environment(bridge)
    aliases = set(_aliases())
    assert set(env) <= aliases, set(env) - aliases
    parsed = Settings(**env)  # type: ignore[arg-type]
    # The API key the emulator accepts is the one the bridge sends.
    emulator_cmd = services["emulator"]["command"]
    assert emulator_cmd[0] == "emulator"
    assert emulator_cmd[emulator_cmd.index("--api-key") + 1] == env["DOCUTRAY_API_KEY"]
    port = emulator_cmd[emulator_cmd.index("--port") + 1]
    assert parsed.docutray_base_url == f"http://emulator:{port}"
    # Kafka: the bridge uses the listener the broker advertises inside the network.
    kafka_env = _environment(services["kafka"])
    assert f"PLAINTEXT://{parsed.kafka_bootstrap_servers}" in kafka_env[
        "KAFKA_ADVERTISED_LISTENERS"
    ].split(",")
    assert parsed.redis == "redis://redis:6379/0"
    # Drain time fits in the stop grace period.
    grace = int(str(bridge["stop_grace_period"]).rstrip("s"))
    assert grace >= parsed.shutdown_grace_s + 5
    assert bridge["read_only"] is True
    assert bridge["tmpfs"] == ["/tmp"]
    # Prometheus scrapes the bridge's metrics port.
    prom = yaml.safe_load((ROOT / "deploy/compose/prometheus/prometheus.yml").read_text())
    targets = prom["scrape_configs"][0]["static_configs"][0]["targets"]
    assert targets == [f"bridge:{parsed.metrics_port}"]


def test_compose_emulator_options_exist() -> None:
    from click.testing import CliRunner

    from service.cli import main

    result = CliRunner().invoke(main, ["emulator", "--help"])
    assert result.exit_code == 0, result.output
    for option in [a for a in compose()["services"]["emulator"]["command"] if a.startswith("--")]:
        assert option in result.output, option


def test_compose_grafana_provisioning_points_at_the_dashboard() -> None:
    grafana = compose()["services"]["grafana"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"])
    provider = yaml.safe_load(
        (ROOT / "deploy/compose/grafana/provisioning/dashboards/docutray-bridge.yaml").read_text()
    )
    path = provider["providers"][0]["options"]["path"]
    assert mounts["./deploy/helm/docutray-bridge/dashboards"] == path
    home = _environment(grafana)["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{path}/{DASHBOARD.name}"
    datasources = yaml.safe_load(
        (ROOT / "deploy/compose/grafana/provisioning/datasources/prometheus.yaml").read_text()
    )
    (ds,) = datasources["datasources"]
    assert ds["type"] == "prometheus"
    assert ds["isDefault"] is True
    assert ds["url"] == "http://prometheus:9090"


def test_compose_prometheus_config_and_rules_pass_promtool(tmp_path: Path) -> None:
    prometheus = compose()["services"]["prometheus"]
    mounts = dict(v.split(":")[:2] for v in prometheus["volumes"])
    # Lay the files out as the container sees them, relative to the config file.
    etc = tmp_path / "etc" / "prometheus"
    for source, target in mounts.items():
        assert target.startswith("/etc/prometheus"), target
        dest = tmp_path / target.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        src = ROOT / source
        if src.is_dir():
            shutil.copytree(src, dest)
        else:
            shutil.copy(src, dest)
    proc = promtool("check", "config", str(etc / "prometheus.yml"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"{len(ALERTS)} rules found" in proc.stdout


def test_shell_snippets_in_the_docs_name_real_files() -> None:
    doc = OPERATIONS_DOC.read_text(encoding="utf-8")
    charts = re.findall(r"helm upgrade --install \S+ (\S+)", doc)
    assert charts
    for chart in charts:
        assert (ROOT / chart / "Chart.yaml").is_file(), chart


# --- docs/production.md ----------------------------------------------------------------

PRODUCTION_DOC = ROOT / "docs" / "production.md"


def test_production_doc_is_linked_and_its_references_exist() -> None:
    readme = OPERATIONS_DOC.read_text(encoding="utf-8")
    assert "](docs/production.md)" in readme
    doc = PRODUCTION_DOC.read_text(encoding="utf-8")
    anchors = {github_anchor(h) for h in re.findall(r"^#+ (.+)$", doc, re.M)}
    links = re.findall(r"\]\(#([^)]+)\)", doc)
    assert links, "expected a table of contents"
    assert set(links) <= anchors, set(links) - anchors
    named = set(re.findall(r"ci/([\w-]+-values\.yaml)", doc))
    assert {"strimzi-values.yaml", "confluent-cloud-values.yaml", "msk-values.yaml"} <= named
    for name in named:
        assert (CHART / "ci" / name).is_file(), name
    # The YAML examples (KafkaUser, KafkaTopic) parse.
    blocks = re.findall(r"```yaml\n(.*?)```", doc, re.S)
    assert {yaml.safe_load(b)["kind"] for b in blocks} == {"KafkaUser", "KafkaTopic"}
    # Every setting the doc names is one the bridge reads.
    for name in set(re.findall(r"\b(BRIDGE_[A-Z_]+|DOCUTRAY_[A-Z_]+)\b", doc)):
        assert name in _aliases(), name


@pytest.mark.parametrize(
    ("limit", "mib"),
    [("2Gi", "2048"), ("1536Mi", "1536"), ("800M", "762"), ("1000000000", "953"), ("1G", "953")],
)
def test_memory_budget_follows_the_memory_limit(limit: str, mib: str) -> None:
    docs = render(sets=(f"resources.limits.memory={limit}",))
    assert config_data(docs)["BRIDGE_MEMORY_BUDGET_MB"] == mib


def test_memory_budget_explicit_absent_or_too_small() -> None:
    docs = render(sets=("memoryBudgetMB=300",))
    assert config_data(docs)["BRIDGE_MEMORY_BUDGET_MB"] == "300"
    no_limit = render(sets=("resources.limits=null",))
    assert "BRIDGE_MEMORY_BUDGET_MB" not in config_data(no_limit)  # the bridge's own default
    assert "minimum of 64Mi" in render_error("resources.limits.memory=32Mi")


def test_webhook_port_opens_only_when_webhooks_are_on() -> None:
    assert [p["name"] for p in container(render())["ports"]] == ["metrics"]
    docs = render(
        sets=("settings.BRIDGE_WEBHOOKS_ENABLED=true", "settings.BRIDGE_WEBHOOK_PORT=9555")
    )
    assert {"name": "webhook", "containerPort": 9555, "protocol": "TCP"} in container(docs)["ports"]
    service = one(docs, "Service", FULLNAME)
    assert {"name": "webhook", "port": 9555, "targetPort": "webhook", "protocol": "TCP"} in (
        service["spec"]["ports"]
    )
