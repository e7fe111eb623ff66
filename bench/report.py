"""Judge results against the targets of issues 8, 12 and 11.6; tables, chart and README.

Pure functions of the results dict (``bench/results/latest.json``), so the
table and chart can be rebuilt without running anything:
``python -m bench.report`` re-renders from the stored JSON.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _row(
    scenario: str, target: str, measured: str, ok: bool | None, note: str = ""
) -> dict[str, Any]:
    return {"scenario": scenario, "target": target, "measured": measured, "pass": ok, "note": note}


def judge(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per target (issues 8, 12 and 11.6) that the stored results can answer."""
    rows: list[dict[str, Any]] = []
    sc = results.get("scenarios", {})
    s1 = sc.get("1")
    if s1 and "contenders" in s1:
        by = {c["contender"]: c for c in s1["contenders"]}
        naive = by.get("sdk-naive", {}).get("docs_per_min") or 0
        for name in ("bridge-1", "bridge-3"):
            c = by.get(name)
            if not c:
                continue
            rows.append(
                _row(
                    "1",
                    f"{name}: >= 90 % of the physical limit (600 / 2 calls = 300 docs/min)",
                    f"{c['docs_per_min']} docs/min = {c['share_of_ideal_limit'] * 100:.0f} %",
                    c["share_of_ideal_limit"] >= 0.9,
                    f"{c['api_calls_per_doc']} API calls/doc; "
                    f"{(c['share_of_own_limit'] or 0) * 100:.0f} % of 600 / its own calls per doc",
                )
            )
            rows.append(
                _row(
                    "1",
                    f"{name}: zero 429s",
                    f"{c['rate_limited_429']} x 429",
                    c["rate_limited_429"] == 0,
                )
            )
            ratio = c["docs_per_min"] / naive if naive else None
            rows.append(
                _row(
                    "1",
                    f"{name}: > 20 x the naive loop's docs/min",
                    f"{ratio:.1f} x ({c['docs_per_min']} vs {naive})" if ratio else "n/a",
                    bool(ratio and ratio > 20),
                )
            )
    s2 = sc.get("2")
    if s2 and "measured" in s2:
        m = s2["measured"]
        rows.append(
            _row(
                "2",
                ">= 1,000 requests/s per replica",
                f"{m['requests_per_s']} requests/s ({m['requests']} requests)",
                m["requests_per_s"] >= 1000,
            )
        )
        rows.append(
            _row(
                "2",
                "< 1 CPU-second per 1,000 requests",
                f"{m['bridge_cpu_s_per_1000']} CPU-s / 1,000",
                m["bridge_cpu_s_per_1000"] < 1.0,
            )
        )
    s3 = sc.get("3")
    if s3 and "rss_mb_peak" in s3:
        scaled = "" if s3["requests"] >= 100_000 else f"measured at {s3['requests']:,} pending only"
        rows.append(
            _row(
                "3",
                "< 300 MB RSS with 100,000 pending",
                f"{max(s3['rss_mb_peak'], s3.get('restart_rss_mb_peak', 0))} MB peak "
                f"at {s3['requests']:,} pending",
                max(s3["rss_mb_peak"], s3.get("restart_rss_mb_peak", 0)) < 300
                if not scaled
                else None,
                scaled,
            )
        )
        rows.append(
            _row(
                "3",
                "restore < 10 s",
                f"{s3['restore_seconds_metric_sum']} s restore metric; "
                f"{s3['restart_ready_s']} s process start to ready",
                s3["restart_ready_s"] < 10 if not scaled else None,
                scaled,
            )
        )
    s4 = sc.get("4")
    if s4 and "simulated" in s4:
        for r in s4["simulated"]:
            if r["policy"] != "adaptive (defaults)":
                continue
            rows.append(
                _row(
                    "4",
                    f"median {r['median_s']:g} s (simulated): < 1.5 calls and "
                    f"p95 delay < {r['target_delay_p95_s']:g} s",
                    f"{r['status_calls_per_conversion']} calls, p95 {r['detection_delay_p95_s']} s",
                    r["meets_calls_target"] and r["meets_delay_target"],
                )
            )
        for r in s4.get("live", []):
            if not r["contender"].startswith("bridge"):
                continue
            rows.append(
                _row(
                    "4",
                    f"median {r['median_s']:g} s (live, bridge): < 1.5 calls and "
                    f"p95 delay < {r['target_delay_p95_s']:g} s",
                    f"{r['status_calls_per_conversion']} calls, p95 {r['detection_delay_p95_s']} s",
                    r["meets_calls_target"] and r["meets_delay_target"],
                )
            )
    rows.extend(_judge_big(sc))
    return rows


def _judge_big(sc: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows for scenarios 3b and 5-8 (issue 12's targets and issue 11.6's dedupe memory)."""
    rows: list[dict[str, Any]] = []
    s3b = sc.get("3b")
    if s3b and "rss_mb_peak_vmhwm" in s3b:
        n = s3b["requests"]
        scaled = "" if n >= 100_000 else f"measured at {n:,} pending"
        peak = max(s3b["rss_mb_peak_vmhwm"], s3b.get("restart_rss_mb_peak_vmhwm", 0))
        rows.append(
            _row(
                "3b",
                "100,000 pending small requests: RSS < 200 MB",
                f"{peak} MB peak (VmHWM) at {n:,} queued, {s3b.get('restart_rss_mb')} MB restored",
                peak < 200 if not scaled else None,
                scaled,
            )
        )
        rows.append(
            _row(
                "3b",
                "restore < 5 s",
                f"{s3b['restore_seconds_metric_sum']} s restore metric; "
                f"{s3b['restart_kill_to_ready_s']} s kill -9 to ready",
                s3b["restart_kill_to_ready_s"] < 5 if not scaled else None,
                scaled,
            )
        )
    s5 = sc.get("5")
    if s5 and "rss_mb_peak_vmhwm" in s5:
        n = s5["requests"]
        scaled = "" if n >= 10_000 else f"measured at {n:,} pending, not 10,000"
        peak = max(s5["rss_mb_peak_vmhwm"], s5.get("restart_rss_mb_peak_vmhwm", 0))
        rows.append(
            _row(
                "5",
                "10,000 pending 1 MB documents: RSS < 300 MB",
                f"{peak} MB peak (VmHWM) at {n:,} pending, "
                f"{s5['rss_mb_filled']} MB filled, {s5.get('restart_rss_mb')} MB restored",
                peak < 300 if not scaled else None,
                scaled,
            )
        )
        rows.append(
            _row(
                "5",
                "restore after kill -9 < 10 s",
                f"{s5['restart_kill_to_ready_s']} s kill to ready, "
                f"{s5['restart_kill_to_all_pending_s']} s to all {n:,} pending",
                s5["restart_kill_to_ready_s"] < 10 if not scaled else None,
                scaled,
            )
        )
    s6 = sc.get("6")
    if s6 and "input_uncompressed" in s6:
        for label, key in (("uncompressed", "input_uncompressed"), ("zstd", "input_zstd")):
            r = s6.get(key) or {}
            if "amplification_vs_input_topic" not in r:
                continue
            rows.append(
                _row(
                    "6",
                    f"bytes stored per input byte <= 2.2 (input produced {label})",
                    f"{r['amplification_vs_input_topic']} ({r['requests']} requests of 1 MiB)",
                    r["amplification_vs_input_topic"] <= 2.2,
                )
            )
    s7 = sc.get("7")
    if s7 and "outcomes_of_big" in s7:
        seconds = s7.get("finished_to_dead_letter_s")
        rows.append(
            _row(
                "7",
                "3 MB result, results topic at 1048588: result_too_large < 5 s after the "
                "conversion finished",
                f"{s7['outcomes_of_big']}; {seconds} s from DocuTray's finish, "
                f"{s7.get('detected_to_dead_letter_s')} s from the bridge seeing it",
                s7["outcomes_of_big"] == ["result_too_large"]
                and seconds is not None
                and seconds < 5,
            )
        )
        rows.append(
            _row(
                "7",
                "the 5 requests behind it unaffected",
                f"{s7['small_results']} results of {s7['small_outcomes']} outcomes; "
                f"{s7['transactions_aborted']:g} aborted transactions",
                bool(s7["small_each_exactly_one"]) and s7["transactions_aborted"] == 0,
            )
        )
    s8 = sc.get("8")
    if s8 and "rss_mb_holding" in s8:
        rows.append(
            _row(
                "8",
                f"{s8['ids']:,} remembered ids: RSS < 150 MB (process importing service.app)",
                f"{s8['rss_mb_holding']} MB ({s8['rss_mb_after_import']} MB after the import, "
                f"+{s8['rss_mb_for_ids']} MB for the ids); "
                f"{s8['bytes_per_id_tracemalloc']} bytes per id",
                s8["rss_mb_holding"] < 150 if s8["ids"] >= 1_000_000 else None,
                "" if s8["ids"] >= 1_000_000 else f"measured at {s8['ids']:,} ids",
            )
        )
    return rows


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _table(title: str, header: list[str], rows: list[list[Any]]) -> list[str]:
    """A Markdown table under a ``###`` title, then a blank line (cells as given)."""
    return [
        f"{title}\n",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(str(cell) for cell in row) + " |" for row in rows),
        "",
    ]


def tables(results: dict[str, Any]) -> str:
    """The results as Markdown tables (stdout and README share them)."""
    out: list[str] = []
    sc = results.get("scenarios", {})
    s1 = sc.get("1")
    if s1 and "contenders" in s1:
        rows = []
        for c in s1["contenders"]:
            own = c["share_of_own_limit"]
            rows.append(
                [
                    c["contender"],
                    c["docs_per_min"],
                    _fmt(c.get("speedup_vs_naive")),
                    _fmt(c["status_calls_per_doc"]),
                    _fmt(c["api_calls_per_doc"]),
                    c["api_calls_per_min"],
                    c["rate_limited_429"],
                    f"{c['share_of_ideal_limit'] * 100:.0f} %",
                    "-" if own is None else f"{own * 100:.0f} %",
                    f"{_fmt(c['latency_e2e_p50_s'])} / {_fmt(c['latency_e2e_p95_s'])}",
                    f"{_fmt(c['latency_service_p50_s'])} / {_fmt(c['latency_service_p95_s'])}",
                ]
            )
        out += _table(
            f"### 1. Throughput at 600 calls/min (median {s1['processing']['median_s']:g} s; "
            f"{s1['contenders'][0]['window_s']:.0f} s window, mode {s1.get('mode', '?')})",
            [
                *("contender", "docs/min", "x naive", "status calls/doc", "API calls/doc"),
                *("API calls/min", "429s", "share of 300/min", "share of own limit"),
                *("e2e p50/p95 s", "submit→result p50/p95 s"),
            ],
            rows,
        )
    s2 = sc.get("2")
    if s2 and "measured" in s2:
        m = s2["measured"]
        out += _table(
            f"### 2. Raw pipeline cost, one replica (mode {s2.get('mode', '?')})",
            [
                *("requests", "seconds", "requests/s", "bridge CPU-s / 1,000", "cores used"),
                *("emulator CPU-s / 1,000", "dead letters"),
            ],
            [
                [
                    *(m["requests"], m["seconds"], m["requests_per_s"]),
                    *(m["bridge_cpu_s_per_1000"], m["bridge_cpu_utilisation_cores"]),
                    *(m["emulator_cpu_s_per_1000"], m["dead_letters"]),
                ]
            ],
        )
    s3 = sc.get("3")
    if s3 and "rss_mb_peak" in s3:
        out += _table(
            f"### 3. Pending set (mode {s3.get('mode', '?')})",
            [
                *("pending", "fill s", "submits/s", "RSS peak MB", "RSS after restart MB"),
                *("restore metric s", "start→ready s", "start→all adopted s"),
            ],
            [
                [
                    f"{s3['requests']:,}",
                    *(s3["fill_s"], s3["submits_per_s"], s3["rss_mb_peak"]),
                    *(s3.get("restart_rss_mb_peak"), s3["restore_seconds_metric_sum"]),
                    *(s3["restart_ready_s"], s3.get("restart_adopted_s")),
                ]
            ],
        )
    s4 = sc.get("4")
    if s4 and "simulated" in s4:
        runs = [(r, f"{r['policy']} (simulated)") for r in s4["simulated"]]
        runs += [
            (r, f"{r['contender']} (live, {r['conversions']} conv.)") for r in s4.get("live", [])
        ]
        out += _table(
            f"### 4. Polling efficiency (mode {s4.get('mode', '?')})",
            [
                *("median", "policy", "status calls/conversion", "delay p50 s", "delay p95 s"),
                "target p95 s",
            ],
            [
                [
                    f"{r['median_s']:g} s",
                    policy,
                    *(r["status_calls_per_conversion"], r["detection_delay_p50_s"]),
                    r["detection_delay_p95_s"],
                    f"{r['target_delay_p95_s']:g}",
                ]
                for r, policy in runs
            ],
        )
    out.extend(_tables_big(sc))
    verdicts = judge(results)
    if verdicts:
        out.append("### Targets (issues 8, 12, 11.6)\n")
        out.append("| scenario | target | measured | result |")
        out.append("|---|---|---|---|")
        for v in verdicts:
            verdict = {True: "PASS", False: "FAIL", None: "n/a"}[v["pass"]]
            note = f" ({v['note']})" if v["note"] else ""
            out.append(f"| {v['scenario']} | {v['target']} | {v['measured']}{note} | {verdict} |")
        out.append("")
    return "\n".join(out)


def _tables_big(sc: dict[str, Any]) -> list[str]:
    """Tables of scenarios 3b and 5-8."""
    out: list[str] = []
    for key, title in (("3b", "Pending small requests"), ("5", "Pending 1 MiB documents")):
        s5 = sc.get(key)
        if not (s5 and "rss_mb_peak_vmhwm" in s5):
            continue
        out += _table(
            f"### {key}. {title}, budget {s5['config']['BRIDGE_MEMORY_BUDGET_MB']} MB "
            f"(mode {s5.get('mode', '?')})",
            [
                *("pending", "fill s", "MB/s", "RSS filled MB", "peak (VmHWM) MB"),
                *("kill→ready s", "kill→all pending s", "restore metric s", "RSS restored MB"),
                "load (1 min)",
            ],
            [
                [
                    f"{s5['requests']:,}",
                    *(s5["fill_s"], s5["fill_mb_per_s"], s5["rss_mb_filled"]),
                    *(s5["rss_mb_peak_vmhwm"], s5["restart_kill_to_ready_s"]),
                    *(s5["restart_kill_to_all_pending_s"], s5["restore_seconds_metric_sum"]),
                    s5.get("restart_rss_mb"),
                    (s5.get("load_average_restore") or ["?"])[0],
                ]
            ],
        )
    s6 = sc.get("6")
    if s6 and "input_uncompressed" in s6:
        rows = []
        for key in ("input_uncompressed", "input_zstd"):
            r = s6.get(key) or {}
            if "per_input_byte" not in r:
                continue
            per = r["per_input_byte"]
            rows.append(
                [
                    *(r["input_compression"], r["requests"], r["stored_mb"]["input"]),
                    *(per["documents"], per["changelog"], per["results"], per["dedupe"]),
                    *(per["dead_letters"], r["amplification_vs_input_topic"]),
                ]
            )
        out += _table(
            f"### 6. Bytes stored per input byte (mode {s6.get('mode', '?')})",
            [
                *("input produced", "requests", "input MB", "documents", "changelog"),
                *("results", "dedupe", "dead letters", "total / input"),
            ],
            rows,
        )
    s7 = sc.get("7")
    if s7 and "outcomes_of_big" in s7:
        out += _table(
            f"### 7. A 3 MB result, results topic at 1048588 (mode {s7.get('mode', '?')})",
            [
                *("big request", "finished→dead letter s", "seen by bridge→dead letter s"),
                *("small results", "aborted transactions", "status calls"),
            ],
            [
                [
                    ", ".join(s7["outcomes_of_big"]),
                    s7.get("finished_to_dead_letter_s"),
                    s7.get("detected_to_dead_letter_s"),
                    f"{s7['small_results']} / 5",
                    f"{s7['transactions_aborted']:g}",
                    s7["emulator_status_calls"],
                ]
            ],
        )
    s8 = sc.get("8")
    if s8 and "rss_mb_holding" in s8:
        out += _table(
            f"### 8. Dedupe window memory (mode {s8.get('mode', '?')})",
            [
                *("ids", "bytes/id (tracemalloc)", "RSS bare MB", "after import MB"),
                *("holding MB", "for the ids MB", "peak MB"),
            ],
            [
                [
                    f"{s8['ids']:,}",
                    *(s8["bytes_per_id_tracemalloc"], s8["rss_mb_bare"]),
                    *(s8["rss_mb_after_import"], s8["rss_mb_holding"], s8["rss_mb_for_ids"]),
                    s8["vmhwm_mb"],
                ]
            ],
        )
    return out


def chart(results: dict[str, Any], path: Path) -> bool:
    """Bars: docs/min per contender, API calls per document, status calls per conversion."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sc = results.get("scenarios", {})
    s1 = sc.get("1") if sc.get("1", {}).get("contenders") else None
    s4 = sc.get("4") if sc.get("4", {}).get("simulated") else None
    if s1 is None and s4 is None:
        return False
    fig, axes = plt.subplots(1, 3, figsize=(16, 5))
    colours = ["#999999", "#bbbbbb", "#2b7bba", "#1a4f7a"]
    if s1 is not None:
        names = [c["contender"] for c in s1["contenders"]]
        docs = [c["docs_per_min"] for c in s1["contenders"]]
        ax = axes[0]
        bars = ax.bar(names, docs, color=colours[: len(names)])
        ax.axhline(300, color="#c0392b", linestyle="--", linewidth=1)
        ax.text(-0.4, 306, "physical limit 600 / 2 calls = 300", color="#c0392b", fontsize=8)
        ax.set_ylim(0, 345)
        ax.axhline(270, color="#c0392b", linestyle=":", linewidth=1)
        ax.text(-0.4, 250, "90 % target", color="#c0392b", fontsize=8)
        ax.bar_label(bars, fmt="%.0f")
        ax.set_title("1. Documents per minute at 600 API calls/min")
        ax.set_ylabel("documents / minute")
        ax.tick_params(axis="x", labelrotation=15)
        calls = [c["api_calls_per_doc"] or 0 for c in s1["contenders"]]
        status = [c["status_calls_per_doc"] or 0 for c in s1["contenders"]]
        ax = axes[1]
        bars = ax.bar(names, calls, color=colours[: len(names)])
        ax.bar_label(bars, fmt="%.2f")
        ax.scatter(
            names, status, color="black", marker="_", s=400, zorder=3, label="status calls / doc"
        )
        ax.axhline(2, color="#c0392b", linestyle="--", linewidth=1)
        ax.set_title("1. API calls per document (bar) and status calls (tick)")
        ax.set_ylabel("calls / document")
        ax.legend(fontsize=8)
        ax.tick_params(axis="x", labelrotation=15)
    else:
        axes[0].axis("off")
        axes[1].axis("off")
    ax = axes[2]
    if s4 is not None:
        medians = sorted({r["median_s"] for r in s4["simulated"]})
        width = 0.25
        policies = [
            ("adaptive (defaults)", "#2b7bba"),
            ("adaptive, latency-leaning", "#7fb3d5"),
            ("SDK fixed 2 s", "#999999"),
        ]
        for i, (policy, colour) in enumerate(policies):
            values = [
                next(
                    (
                        r["status_calls_per_conversion"]
                        for r in s4["simulated"]
                        if r["median_s"] == m and r["policy"] == policy
                    ),
                    0,
                )
                for m in medians
            ]
            xs = [j + (i - 1) * width for j in range(len(medians))]
            bars = ax.bar(xs, values, width, label=f"{policy} (sim)", color=colour)
            ax.bar_label(bars, fmt="%.1f", fontsize=7)
        for r in s4.get("live", []):
            j = medians.index(r["median_s"]) if r["median_s"] in medians else None
            if j is None:
                continue
            x = j + (-1 if r["contender"].startswith("bridge") else 1) * width
            ax.scatter(
                [x],
                [r["status_calls_per_conversion"]],
                color="black",
                marker="D",
                zorder=3,
                label="live" if r["contender"].startswith("bridge") else None,
            )
        ax.axhline(1.5, color="#c0392b", linestyle="--", linewidth=1)
        ax.set_xticks(range(len(medians)), [f"median {m:g} s" for m in medians])
        ax.set_yscale("log")
        ax.set_title("4. Status calls per conversion")
        ax.legend(fontsize=7)
    else:
        ax.axis("off")
    fig.suptitle(f"docutray-bridge benchmarks ({results.get('mode', '?')} run, 2-core machine)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def readme(results: dict[str, Any]) -> str:
    """`bench/results/README.md`: what was run, the tables, the chart."""
    return (
        "# Benchmark results\n\n"
        "Written by `make bench` (`python -m bench.run`); method and discussion in "
        "[docs/benchmarks.md](../../docs/benchmarks.md). Raw figures: `latest.json`; "
        "profile of scenario 2: `profile-s2.collapsed.txt` (py-spy, collapsed stacks).\n\n"
        f"Last run: {results.get('finished_at', '?')}, mode `{results.get('mode', '?')}`, "
        f"{results.get('machine', {}).get('cpus', '?')} CPUs, load average before "
        f"{results.get('machine', {}).get('load_average_before', '?')}.\n\n"
        "![chart](chart.png)\n\n" + tables(results)
    )


def main() -> None:
    results = json.loads((RESULTS_DIR / "latest.json").read_text())
    print(tables(results))
    chart(results, RESULTS_DIR / "chart.png")
    (RESULTS_DIR / "README.md").write_text(readme(results))


if __name__ == "__main__":
    main()
