"""From batches to figures: per cell (upstream, workload, concurrency, path) latency percentiles,
throughput and CPU; what each gateway adds over the direct path; saturation; ratios; targets."""

from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from bench.common.quantiles import quantile
from bench.gateway.runner import Batch

DIRECT, NGINX, CAPGATE, LITELLM = "direct", "nginx", "capgate", "litellm"
PATHS = (DIRECT, NGINX, CAPGATE, LITELLM)


def _sum(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) if present else None


def _per_1k(cpu: float | None, completed: int) -> float | None:
    return None if cpu is None or completed == 0 else cpu / completed * 1000


def cell_figures(batches: list[Batch]) -> dict[str, Any]:
    """The figures of one cell, merged over its rounds (times in microseconds)."""
    results = [b.result for b in batches]
    latency = [v for r in results for v in r["latency_us"]]
    ttft = [v for r in results for v in r["ttft_us"]]
    itl = [v for r in results for v in r["itl_us"]]
    completed = sum(r["completed"] for r in results)
    wall = sum(r["wall_s"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    cpu = _sum(b.cpu_s for b in batches)
    redis_cpu = _sum(b.redis_cpu_s for b in batches)
    figures: dict[str, Any] = {
        "rounds": len(batches),
        "sent": sum(r["sent"] for r in results),
        "completed": completed,
        "errors": sum(r["errors"] for r in results),
        "error_samples": [s for r in results for s in r["error_samples"]][:5],
        "wall_s": wall,
        "latency_median_us": quantile(latency, 0.5),
        "latency_p99_us": quantile(latency, 0.99),
        "latency_mean_us": sum(latency) / len(latency) if latency else None,
        "requests_per_s": completed / wall if wall else None,
        "gateway_cpu_s": cpu,
        "gateway_cpu_s_per_1k_requests": _per_1k(cpu, completed),
        "redis_cpu_s_per_1k_requests": _per_1k(redis_cpu, completed),
    }
    if tokens:
        total_cpu = (cpu or 0.0) + (redis_cpu or 0.0)
        figures.update(
            {
                "ttft_median_us": quantile(ttft, 0.5),
                "ttft_p99_us": quantile(ttft, 0.99),
                "itl_median_us": quantile(itl, 0.5),
                "itl_p99_us": quantile(itl, 0.99),
                "tokens": tokens,
                "tokens_per_s": tokens / wall if wall else None,
                "gateway_cpu_us_per_token": total_cpu / tokens * 1e6 if cpu is not None else None,
            }
        )
    return figures


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def cells(batches: list[Batch]) -> list[dict[str, Any]]:
    """One entry per cell, with what each gateway adds over the direct path of the same cell."""
    grouped: dict[tuple[str, str, int, str], list[Batch]] = defaultdict(list)
    for batch in batches:
        grouped[(batch.upstream, batch.workload, batch.concurrency, batch.path)].append(batch)
    figures = {key: cell_figures(group) for key, group in grouped.items()}
    found = []
    for (upstream, workload, concurrency, path), own in figures.items():
        direct = figures.get((upstream, workload, concurrency, DIRECT))
        entry = {"upstream": upstream, "workload": workload, "concurrency": concurrency, "path": path, **own}
        if path != DIRECT and direct is not None:
            for name in ("latency_median_us", "latency_p99_us", "ttft_median_us", "itl_median_us"):
                if name in own:
                    entry[f"added_{name}"] = _minus(own[name], direct[name])
        found.append(entry)
    return sorted(found, key=lambda e: (e["upstream"], e["workload"], e["concurrency"], e["path"]))


def _get(entry: dict[str, Any] | None, name: str) -> float | None:
    return None if entry is None else entry.get(name)


def _find(table: list[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
    for entry in table:
        if all(entry.get(k) == v for k, v in match.items()):
            return entry
    return None


def saturation(table: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per upstream, workload and path: the best throughput over the concurrency levels."""
    best: dict[tuple[str, str, str], dict[str, Any]] = {}
    for entry in table:
        key = (entry["upstream"], entry["workload"], entry["path"])
        rate = entry["requests_per_s"] or 0.0
        if key not in best or rate > best[key]["requests_per_s"]:
            best[key] = {
                "upstream": key[0],
                "workload": key[1],
                "path": key[2],
                "requests_per_s": rate,
                "tokens_per_s": entry.get("tokens_per_s"),
                "at_concurrency": entry["concurrency"],
                "gateway_cpu_s_per_1k_requests": entry["gateway_cpu_s_per_1k_requests"],
                "redis_cpu_s_per_1k_requests": entry["redis_cpu_s_per_1k_requests"],
            }
    return sorted(best.values(), key=lambda e: (e["upstream"], e["workload"], e["path"]))


def _cpu_per_1k(entry: dict[str, Any] | None) -> float | None:
    """A gateway's CPU per 1,000 requests, its Redis included."""
    if entry is None or entry["gateway_cpu_s_per_1k_requests"] is None:
        return None
    return entry["gateway_cpu_s_per_1k_requests"] + (entry["redis_cpu_s_per_1k_requests"] or 0.0)


def ratios(table: list[dict[str, Any]], saturated: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """capgate/direct, capgate/nginx and capgate/LiteLLM, per upstream and workload: latency at
    concurrency 1, throughput at saturation, CPU per request."""
    found = []
    for upstream, workload in sorted({(e["upstream"], e["workload"]) for e in table}):
        low = min(e["concurrency"] for e in table if e["upstream"] == upstream and e["workload"] == workload)
        at = {p: _find(table, upstream=upstream, workload=workload, concurrency=low, path=p) for p in PATHS}
        sat = {p: _find(saturated, upstream=upstream, workload=workload, path=p) for p in PATHS}

        found.append(
            {
                "upstream": upstream,
                "workload": workload,
                "at_concurrency": low,
                "capgate_over_direct_latency_median": _ratio(
                    _get(at[CAPGATE], "latency_median_us"), _get(at[DIRECT], "latency_median_us")
                ),
                "capgate_over_direct_requests_per_s_saturated": _ratio(
                    _get(sat[CAPGATE], "requests_per_s"), _get(sat[DIRECT], "requests_per_s")
                ),
                "capgate_over_nginx_added_latency_median": _ratio(
                    _get(at[CAPGATE], "added_latency_median_us"), _get(at[NGINX], "added_latency_median_us")
                ),
                "capgate_over_nginx_requests_per_s_saturated": _ratio(
                    _get(sat[CAPGATE], "requests_per_s"), _get(sat[NGINX], "requests_per_s")
                ),
                "capgate_over_litellm_latency_median": _ratio(
                    _get(at[CAPGATE], "latency_median_us"), _get(at[LITELLM], "latency_median_us")
                ),
                "capgate_over_litellm_added_latency_median": _ratio(
                    _get(at[CAPGATE], "added_latency_median_us"), _get(at[LITELLM], "added_latency_median_us")
                ),
                "capgate_over_litellm_requests_per_s_saturated": _ratio(
                    _get(sat[CAPGATE], "requests_per_s"), _get(sat[LITELLM], "requests_per_s")
                ),
                "capgate_over_litellm_cpu_per_request": _ratio(
                    _cpu_per_1k(at[CAPGATE]), _cpu_per_1k(at[LITELLM])
                ),
            }
        )
    return found


def targets(
    table: list[dict[str, Any]], ratio_table: list[dict[str, Any]], upstream: str
) -> list[dict[str, Any]]:
    """The performance issue's targets, judged on the fast upstream's figures (capgate and its
    redis-server share one core, so requests/s at saturation are per gateway core)."""
    one = _find(table, upstream=upstream, workload="one_token", concurrency=1, path=CAPGATE)
    stream = _find(table, upstream=upstream, workload="stream_256", concurrency=1, path=CAPGATE)
    ratio = _find(ratio_table, upstream=upstream, workload="one_token")
    capgate_cells = [e for e in table if e["upstream"] == upstream and e["path"] == CAPGATE]
    per_core = max(
        (e["requests_per_s"] or 0.0 for e in capgate_cells if e["workload"] == "one_token"), default=None
    )
    streamed = [e for e in capgate_cells if e["workload"] == "stream_256" and e.get("tokens")]
    cpu_per_token = None
    if streamed and all(e.get("gateway_cpu_us_per_token") is not None for e in streamed):
        cpu_per_token = max(e["gateway_cpu_us_per_token"] for e in streamed)

    def judge(name: str, value: float | None, limit: float, below: bool) -> dict[str, Any]:
        met = None if value is None else (value <= limit if below else value >= limit)
        return {"target": name, "value": value, "limit": limit, "met": met}

    return [
        judge("one-token requests/s per gateway core, full metering", per_core, 5000.0, False),
        judge(
            "added median latency, one-token, concurrency 1 (us)",
            _get(one, "added_latency_median_us"),
            300.0,
            True,
        ),
        judge(
            "added median latency, capgate / nginx hop",
            _get(ratio, "capgate_over_nginx_added_latency_median"),
            2.0,
            True,
        ),
        judge("gateway CPU per streamed token, worst level (us)", cpu_per_token, 15.0, True),
        judge(
            "added inter-token latency, stream, concurrency 1 (us)",
            _get(stream, "added_itl_median_us"),
            50.0,
            True,
        ),
    ]
