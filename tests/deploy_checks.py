"""Reusable checks of the deployment artefacts (dashboard, alert rules, chart output).

The main use: every metric a PromQL query names must be one the bridge exports.

    exprs = dashboard_exprs(load_dashboard()) + rule_exprs(load_rules())
    assert unknown_metrics(exprs, scrape_text) == set()

`scrape_text` is a Prometheus text exposition: `prometheus_client.generate_latest()`
in unit tests, or a LIVE scrape of a running bridge's /metrics in end-to-end tests.
A metric counts as exported when its family is declared (# TYPE), even with no sample
yet (a labelled series such as the consumer lag appears only once partitions are
assigned): histograms export `_bucket`/`_sum`/`_count`, counters `_total`.

The metric-name extraction is a small PromQL tokenizer, not a parser: it drops
strings, label matchers, ranges, grouping label lists, numbers and keywords, and
keeps identifiers that are not function calls. Syntax is checked separately with
promtool (see tests/test_deploy.py).

Run as a script to regenerate the metrics table of README.md:

    .venv/bin/python -m tests.deploy_checks --write-metrics-table
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Final

import yaml

ROOT: Final = Path(__file__).resolve().parents[1]
CHART: Final = ROOT / "deploy" / "helm" / "docutray-bridge"
DASHBOARD: Final = CHART / "dashboards" / "docutray-bridge.json"
RULES: Final = CHART / "rules" / "docutray-bridge.rules.yaml"
OPERATIONS_DOC: Final = ROOT / "README.md"
TABLE_START: Final = "<!-- metrics-table:start (generated: python -m tests.deploy_checks) -->"
TABLE_END: Final = "<!-- metrics-table:end -->"

_KEYWORDS: Final = frozenset(
    {
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "offset",
        "bool",
        "and",
        "or",
        "unless",
        "atan2",
        "inf",
        "nan",
    }
)
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_NAME_MATCHER = re.compile(r'__name__\s*=\s*"((?:[^"\\]|\\.)*)"')
_GRAFANA_VAR = re.compile(r"\$\{[^}]*\}|\$\w+")
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(
    r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", re.IGNORECASE
)
_OFFSET = re.compile(r"\boffset\s+-?[0-9a-z]+", re.IGNORECASE)
_NUMBER = re.compile(r"(?<![\w:])(?:0x[0-9a-f]+|(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?)", re.I)
_IDENT = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_VALUES = re.compile(r"^\s*label_values\((.*),\s*[a-zA-Z_][a-zA-Z0-9_]*\s*\)\s*$", re.S)
_LABEL_VALUES_BARE = re.compile(r"^\s*label_values\(\s*[a-zA-Z_][a-zA-Z0-9_]*\s*\)\s*$")
_QUERY_RESULT = re.compile(r"^\s*query_result\((.*)\)\s*$", re.S)


def promql_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression (Grafana variables allowed) selects."""
    names = {m.group(1) for m in _NAME_MATCHER.finditer(expr)}
    text = _STRING.sub(" ", expr)
    text = _GRAFANA_VAR.sub(" ", text)
    text = _MATCHERS.sub(" ", text)
    text = _RANGE.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    text = _OFFSET.sub(" ", text)
    text = _NUMBER.sub(" ", text)
    for match in _IDENT.finditer(text):
        word = match.group(0)
        if word.lower() in _KEYWORDS:
            continue
        if re.match(r"\s*\(", text[match.end() :]):
            continue  # a function or aggregation call
        names.add(word)
    return names


def exported_metric_names(scrape_text: str) -> set[str]:
    """Every series name a Prometheus server can see from this exposition text."""
    from prometheus_client.parser import text_string_to_metric_families

    suffixes: dict[str, tuple[str, ...]] = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
        "summary": ("", "_sum", "_count", "_created"),
        "info": ("_info",),
    }
    names: set[str] = set()
    for family in text_string_to_metric_families(scrape_text):
        names.update(s.name for s in family.samples)
        for suffix in suffixes.get(family.type, ("",)):
            names.add(family.name + suffix)
    return names


#: Series Prometheus makes itself for every target (the "bridge down" alerts use `up`).
PROMETHEUS_OWN_SERIES = frozenset({"up", "scrape_duration_seconds", "scrape_samples_scraped"})


def unknown_metrics(exprs: Iterable[str], scrape_text: str) -> set[str]:
    """Metric names used by `exprs` that the scrape does not export (empty: all good)."""
    used: set[str] = set()
    for expr in exprs:
        used |= promql_metric_names(expr)
    return used - exported_metric_names(scrape_text) - PROMETHEUS_OWN_SERIES


def load_dashboard(path: Path = DASHBOARD) -> dict[str, Any]:
    """The dashboard JSON as a dict."""
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


def load_rules(path: Path = RULES) -> dict[str, Any]:
    """The Prometheus rule file as a dict."""
    data: dict[str, Any] = yaml.safe_load(path.read_text(encoding="utf-8"))
    return data


def iter_panels(panels: Iterable[Mapping[str, Any]]) -> Iterable[Mapping[str, Any]]:
    """Every panel, rows' nested (collapsed) panels included."""
    for panel in panels:
        yield panel
        yield from iter_panels(panel.get("panels", []))


def _variable_query(variable: Mapping[str, Any]) -> str | None:
    query = variable.get("query")
    if isinstance(query, Mapping):
        query = query.get("query")
    if not isinstance(query, str) or not query.strip():
        return None
    if _LABEL_VALUES_BARE.match(query):
        return None
    if m := _LABEL_VALUES.match(query):
        return m.group(1)
    if m := _QUERY_RESULT.match(query):
        return m.group(1)
    return query


def dashboard_exprs(dashboard: Mapping[str, Any]) -> list[str]:
    """Every PromQL expression of a dashboard: panel targets and query variables."""
    exprs = [
        str(target["expr"])
        for panel in iter_panels(dashboard.get("panels", []))
        for target in panel.get("targets", [])
        if target.get("expr")
    ]
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "query" and (query := _variable_query(variable)):
            exprs.append(query)
    return exprs


def rule_exprs(rules: Mapping[str, Any]) -> list[str]:
    """Every `expr` of a Prometheus rule file (or a PrometheusRule `spec`)."""
    return [str(rule["expr"]) for group in rules["groups"] for rule in group["rules"]]


def grafana_expr_as_promql(expr: str) -> str:
    """A dashboard expression with Grafana's variables replaced, so promtool can parse it."""
    out = expr.replace("$__rate_interval", "5m").replace("$__interval", "1m")
    out = out.replace("$__range", "1h")
    return _GRAFANA_VAR.sub(".*", out)


# Minimal schemas of the CRD objects the chart can render: kubernetes-validate ships
# schemas for built-in kinds only. Required fields and types the operators act on.
_LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
_METADATA = {
    "type": "object",
    "required": ["name", "namespace"],
    "properties": {
        "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63},
        "namespace": {"type": "string", "minLength": 1},
        "labels": _LABELS,
        "annotations": _LABELS,
    },
}
CRD_SCHEMAS: Final[dict[tuple[str, str], dict[str, Any]]] = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): {
        "type": "object",
        "required": ["metadata", "spec"],
        "properties": {
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "required": ["selector", "endpoints"],
                "additionalProperties": False,
                "properties": {
                    "selector": {
                        "type": "object",
                        "required": ["matchLabels"],
                        "properties": {"matchLabels": _LABELS},
                    },
                    "namespaceSelector": {
                        "type": "object",
                        "properties": {
                            "matchNames": {"type": "array", "items": {"type": "string"}},
                            "any": {"type": "boolean"},
                        },
                    },
                    "jobLabel": {"type": "string"},
                    "endpoints": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "required": ["port"],
                            "additionalProperties": False,
                            "properties": {
                                "port": {"type": "string"},
                                "path": {"type": "string", "pattern": "^/"},
                                "interval": {"type": "string", "pattern": r"^\d+(ms|s|m|h)$"},
                                "scrapeTimeout": {
                                    "type": "string",
                                    "pattern": r"^\d+(ms|s|m|h)$",
                                },
                                "relabelings": {"type": "array"},
                                "metricRelabelings": {"type": "array"},
                            },
                        },
                    },
                },
            },
        },
    },
    ("monitoring.coreos.com/v1", "PrometheusRule"): {
        "type": "object",
        "required": ["metadata", "spec"],
        "properties": {
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "required": ["groups"],
                "additionalProperties": False,
                "properties": {
                    "groups": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "required": ["name", "rules"],
                            "properties": {
                                "name": {"type": "string", "minLength": 1},
                                "interval": {"type": "string"},
                                "rules": {
                                    "type": "array",
                                    "items": {
                                        "type": "object",
                                        "required": ["alert", "expr"],
                                        "additionalProperties": False,
                                        "properties": {
                                            "alert": {"type": "string", "minLength": 1},
                                            "expr": {"type": "string", "minLength": 1},
                                            "for": {"type": "string"},
                                            "labels": _LABELS,
                                            "annotations": _LABELS,
                                        },
                                    },
                                },
                            },
                        },
                    }
                },
            },
        },
    },
    ("keda.sh/v1alpha1", "ScaledObject"): {
        "type": "object",
        "required": ["metadata", "spec"],
        "properties": {
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "required": ["scaleTargetRef", "triggers"],
                "additionalProperties": False,
                "properties": {
                    "scaleTargetRef": {
                        "type": "object",
                        "required": ["name"],
                        "properties": {
                            "apiVersion": {"type": "string"},
                            "kind": {"type": "string"},
                            "name": {"type": "string"},
                        },
                    },
                    "minReplicaCount": {"type": "integer", "minimum": 0},
                    "maxReplicaCount": {"type": "integer", "minimum": 1},
                    "pollingInterval": {"type": "integer", "minimum": 1},
                    "cooldownPeriod": {"type": "integer", "minimum": 0},
                    "advanced": {"type": "object"},
                    "triggers": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "required": ["type", "metadata"],
                            "properties": {
                                "type": {"type": "string"},
                                # KEDA reads trigger metadata as a map of strings.
                                "metadata": _LABELS,
                                "authenticationRef": {
                                    "type": "object",
                                    "required": ["name"],
                                    "properties": {"name": {"type": "string"}},
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}


def validate_crd(doc: Mapping[str, Any]) -> None:
    """Validate a CRD object against its minimal schema; KeyError for an unknown kind."""
    import jsonschema  # type: ignore[import-untyped]

    schema = CRD_SCHEMAS[(str(doc["apiVersion"]), str(doc["kind"]))]
    jsonschema.validate(dict(doc), schema)


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    slug = heading.strip().lower()
    slug = re.sub(r"[^\w\- ]", "", slug)
    return slug.replace(" ", "-")


def metrics_table_markdown() -> str:
    """The README/operations metrics table, generated from service.metrics' objects."""
    from prometheus_client.metrics import MetricWrapperBase

    from service import metrics

    exposed_suffix = {"counter": "_total", "info": "_info"}
    rows = [
        "| metric | type | labels | meaning |",
        "| --- | --- | --- | --- |",
    ]
    for obj in vars(metrics).values():
        if not isinstance(obj, MetricWrapperBase):
            continue
        kind = str(obj._type)
        if kind == "histogram":
            name = f"`{obj._name}` (`_bucket`, `_sum`, `_count`)"
        else:
            name = f"`{obj._name}{exposed_suffix.get(kind, '')}`"
        labels = ", ".join(f"`{label}`" for label in obj._labelnames) or "none"
        if kind == "info":
            labels = "`version`, `python`, `confluent_kafka`, `librdkafka`"
        meaning = " ".join(str(obj._documentation).split()).replace("|", "\\|")
        rows.append(f"| {name} | {kind} | {labels} | {meaning} |")
    return "\n".join(rows)


def metrics_table_in_doc(text: str) -> str:
    """The generated table block between the markers of README.md."""
    start = text.index(TABLE_START) + len(TABLE_START)
    end = text.index(TABLE_END)
    return text[start:end].strip()


def write_metrics_table(path: Path = OPERATIONS_DOC) -> None:
    """Replace the table between the markers with a freshly generated one."""
    text = path.read_text(encoding="utf-8")
    start = text.index(TABLE_START) + len(TABLE_START)
    end = text.index(TABLE_END)
    text = text[:start] + "\n" + metrics_table_markdown() + "\n" + text[end:]
    path.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    if sys.argv[1:] == ["--write-metrics-table"]:
        write_metrics_table()
        print(f"wrote the metrics table of {OPERATIONS_DOC}", file=sys.stderr)
    else:
        print(metrics_table_markdown())
