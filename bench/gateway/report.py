"""The Markdown report: the machine, the targets, a headline table per upstream and every cell."""

from typing import Any

from bench.gateway.stats import PATHS


def _ms(us: float | None) -> str:
    return "–" if us is None else f"{us / 1000:.2f}"


def _us(us: float | None) -> str:
    return "–" if us is None else f"{us:.0f}"


def _num(value: float | None, digits: int = 0) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def _cpu(entry: dict[str, Any]) -> str:
    own = entry.get("gateway_cpu_s_per_1k_requests")
    if own is None:
        return "–"
    redis = entry.get("redis_cpu_s_per_1k_requests")
    return f"{own:.3f}" if redis is None else f"{own:.3f} + {redis:.3f} redis"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _headline(results: dict[str, Any], upstream: str) -> list[str]:
    cells = [e for e in results["cells"] if e["upstream"] == upstream]
    saturated = {(e["workload"], e["path"]): e for e in results["saturation"] if e["upstream"] == upstream}
    memory = results["peak_memory_mib"].get(upstream, {})
    rows = []
    for workload in results["workloads"]:
        low = [
            e
            for e in cells
            if e["workload"] == workload and e["concurrency"] == min(results["levels"][upstream])
        ]
        for entry in sorted(low, key=lambda e: PATHS.index(e["path"])):
            sat = saturated[(workload, entry["path"])]
            stream = "tokens" in entry
            rows.append(
                [
                    workload,
                    entry["path"],
                    _ms(entry["latency_median_us"]),
                    _us(entry.get("added_latency_median_us")),
                    _ms(entry["latency_p99_us"]),
                    _us(entry.get("added_latency_p99_us")),
                    _us(entry.get("added_ttft_median_us")) if stream else "",
                    _num(entry.get("added_itl_median_us"), 1) if stream else "",
                    f"{_num(sat['requests_per_s'])} (c={sat['at_concurrency']})",
                    _num(sat["tokens_per_s"]) if stream else "",
                    _cpu(entry),
                    _num(memory.get(entry["path"])),
                ]
            )
    header = [
        "workload",
        "path",
        "median ms",
        "added median µs",
        "p99 ms",
        "added p99 µs",
        "added TTFT µs",
        "added ITL µs",
        "req/s at saturation",
        "tokens/s at saturation",
        "gateway CPU s / 1k req",
        "peak RSS MiB",
    ]
    level = min(results["levels"][upstream])
    return [
        f"Latency at concurrency {level}; throughput at the best concurrency level.",
        "",
        *_table(header, rows),
    ]


def _cells(results: dict[str, Any], upstream: str) -> list[str]:
    rows = []
    for e in results["cells"]:
        if e["upstream"] != upstream:
            continue
        rows.append(
            [
                e["workload"],
                str(e["concurrency"]),
                e["path"],
                f"{e['completed']}/{e['sent']}",
                str(e["errors"]),
                _ms(e["latency_median_us"]),
                _ms(e["latency_p99_us"]),
                _us(e.get("added_latency_median_us")),
                _us(e.get("added_latency_p99_us")),
                _num(e["requests_per_s"]),
                _ms(e.get("ttft_median_us")),
                _num(e.get("itl_median_us"), 1),
                _num(e.get("added_itl_median_us"), 1),
                _num(e.get("tokens_per_s")),
                _cpu(e),
                _num(e.get("gateway_cpu_us_per_token"), 1),
            ]
        )
    header = [
        "workload",
        "c",
        "path",
        "ok/sent",
        "err",
        "median ms",
        "p99 ms",
        "added median µs",
        "added p99 µs",
        "req/s",
        "TTFT ms",
        "ITL µs",
        "added ITL µs",
        "tokens/s",
        "gateway CPU s / 1k req",
        "CPU µs / token",
    ]
    return _table(header, rows)


def _profiles(profiles: list[dict[str, Any]]) -> list[str]:
    lines: list[str] = []
    for found in profiles:
        load = f"{found['workload']} at concurrency {found['concurrency']}"
        samples = f"{found['samples']} samples over {found['seconds']:.0f} s"
        lines += [
            "",
            f"## Where capgate's time goes: py-spy, {load}",
            "",
            f"{samples}; flame graph: `{found['flame_graph']}`",
            "",
        ]
        lines += _table(
            ["component", "share"], [[c["component"], f"{c['share']:.0%}"] for c in found["components"]]
        )
        lines += [
            "",
            *_table(
                ["frame (own samples)", "share"],
                [[f"`{f['frame']}`", f"{f['share']:.1%}"] for f in found["top_own_frames"][:10]],
            ),
        ]
        lines += [
            "",
            *_table(
                ["capgate frame (samples under it)", "share"],
                [[f"`{f['frame']}`", f"{f['share']:.1%}"] for f in found["top_capgate_frames"][:10]],
            ),
        ]
    return lines


def markdown(results: dict[str, Any]) -> str:
    """The whole report."""
    machine = results["machine"]
    lines = [
        "# capgate benchmark",
        "",
        f"Run {results['started_at']} on {machine['cpu_model']}, {machine['cores']} cores, "
        f"{machine['memory_gib']} GiB, Python {machine['python']}; capgate {machine['capgate']}, "
        f"nginx {machine.get('nginx') or '–'}, LiteLLM {machine.get('litellm') or '–'}, "
        f"vLLM {machine.get('vllm') or '–'}, "
        f"redis-server {machine['redis_server']}. Load average at start "
        f"{', '.join(f'{x:.2f}' for x in machine['load_average_at_start'])}, at end "
        f"{', '.join(f'{x:.2f}' for x in machine['load_average_at_end'])}.",
        "",
        f"Pinning: {results['pinning']}. Wall time {results['wall_s']:.0f} s.",
    ]
    lines += ["", *(f"Note: {note}" for note in results["notes"])]
    lines += ["", "## Targets (fast upstream)", ""]
    lines += _table(
        ["target", "value", "limit", "met"],
        [
            [
                t["target"],
                _num(t["value"], 2),
                _num(t["limit"], 0),
                {True: "yes", False: "**no**", None: "–"}[t["met"]],
            ]
            for t in results["targets"]
        ],
    )
    lines += ["", "## Ratios", ""]
    lines += _table(
        [
            "upstream",
            "workload",
            "capgate/direct median",
            "capgate/direct req/s sat",
            "capgate/nginx added median",
            "capgate/nginx req/s sat",
            "capgate/LiteLLM added median",
            "capgate/LiteLLM req/s sat",
            "capgate/LiteLLM CPU per request",
        ],
        [
            [
                r["upstream"],
                r["workload"],
                _num(r["capgate_over_direct_latency_median"], 2),
                _num(r["capgate_over_direct_requests_per_s_saturated"], 2),
                _num(r["capgate_over_nginx_added_latency_median"], 2),
                _num(r["capgate_over_nginx_requests_per_s_saturated"], 3),
                _num(r["capgate_over_litellm_added_latency_median"], 3),
                _num(r["capgate_over_litellm_requests_per_s_saturated"], 1),
                _num(r["capgate_over_litellm_cpu_per_request"], 3),
            ]
            for r in results["ratios"]
        ],
    )
    lines += _profiles(results.get("profiles") or [])
    for upstream, about in results["upstreams"].items():
        lines += ["", f"## {upstream} upstream", "", about, "", *_headline(results, upstream)]
        lines += ["", "### Every cell", "", *_cells(results, upstream)]
    return "\n".join(lines) + "\n"
