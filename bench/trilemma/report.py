"""The trilemma's report: a Markdown table per part and a plot of cost, optimality and exactness
against the lease size (matplotlib, the optional `bench` extra)."""

from pathlib import Path
from typing import Any

LOG_TICKS = (1, 2, 5, 10, 20, 50, 100, 200, 500)


def _num(value: Any, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}f}"


def _pair(row: dict, a: str, b: str, digits: int = 2) -> str:
    return f"{_num(row[a], digits)} / {_num(row[b], digits)}"


def cost_table(cost: dict) -> list[str]:
    lines = [
        f"## 1. What metering adds per request ({cost['upstream']} upstream)",
        "",
        f"A streamed chat completion of {cost['stream_tokens']} tokens (a token every "
        f"{cost['token_interval_ms']} ms), {cost['requests_per_lease']} requests per lease size through "
        f"capgate, each paired with one sent directly to the same upstream (interleaved, concurrency "
        f"{cost['concurrency']}). Added TTFT and stream time: quantiles of each capgate request's time "
        "minus its paired direct request's; added inter-token gap: capgate's quantile minus direct's.",
        "",
        "| lease | Redis round trips / request (Redis count; expected; capgate metrics) | added TTFT "
        "median / p99 ms | added stream time median / p99 ms | added inter-token gap median / p99 us "
        "| capgate pre-forward median / p99 ms | reserve median ms | gateway CPU ms / request | "
        "Redis CPU ms / request | errors |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in cost["rows"]:
        trips = (
            f"{row['round_trips_per_request']:.2f}; {row['round_trips_expected']}; "
            f"{row['round_trips_from_metrics']:.2f}"
        )
        lines.append(
            f"| {row['label']} | {trips} | {_pair(row, 'added_ttft_median_ms', 'added_ttft_p99_ms')} | "
            f"{_pair(row, 'added_duration_median_ms', 'added_duration_p99_ms')} | "
            f"{_pair(row, 'added_itl_median_us', 'added_itl_p99_us', 0)} | "
            f"{_pair(row, 'gateway_added_median_ms', 'gateway_added_p99_ms', 3)} | "
            f"{_num(row['redis_reserve_median_ms'], 3)} | {_num(row['gateway_cpu_ms_per_request'])} | "
            f"{_num(row['redis_cpu_ms_per_request'])} | {row['errors']} |"
        )
    return lines


def trilemma_table(tri: dict) -> list[str]:
    lines = [
        f"## 2. The trilemma, measured ({tri['upstream']} upstream)",
        "",
        f"{tri['users']} users x {tri['slots']} concurrent clients x {tri['per_slot']} requests each, "
        f"run {tri['rounds']} times per lease size (fresh users each time, lease sizes interleaved), "
        f"max_tokens {tri['max_tokens']}; the model stops by itself after the tokens each request "
        f"needs (a quarter run to max_tokens). Cap {tri['cap_tokens_per_user']} completion tokens per user "
        f"({tri['cap_fraction']:.0%} of the mean demand of {tri['mean_demand']} tokens).",
        "",
        "| lease | round trips / request | TTFT median / p99 ms | time per token median / p99 ms | "
        "gateway CPU ms / request | held, never used (mean per user, % of cap) | held, not yet received "
        "| refused | cut short (at budget) | denied that would have fit: requests / tokens | cap used | "
        "errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in tri["rows"]:
        lines.append(
            f"| {row['label']} | {row['round_trips_per_request']:.2f} | "
            f"{_pair(row, 'ttft_median_ms', 'ttft_p99_ms', 1)} | "
            f"{_pair(row, 'itl_median_ms', 'itl_p99_ms')} | "
            f"{_num(row['gateway_cpu_ms_per_request'])} | {row['never_used_mean_share_of_cap']:.1%} | "
            f"{row['unused_mean_share_of_cap']:.1%} | {row['refused']} | "
            f"{row['cut_short']} ({row['cut_at_budget']}) | "
            f"{row['denied_would_fit_requests']} / {row['denied_would_fit_tokens']} | "
            f"{row['cap_use']:.1%} | {row['errors']} |"
        )
    lines += [
        "",
        "Exactness (completion tokens, all users of a lease size together):",
        "",
        "| lease | read by clients | billed (ledger) | generated (vLLM's count) | generated, never billed | "
        "billed over the caps: total / worst user | users over their cap |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in tri["rows"]:
        lines.append(
            f"| {row['label']} | {row['client_seen_tokens']} | {row['billed_completion_tokens']} | "
            f"{row['vllm_generated_tokens']} | {row['unbilled_tokens']} | "
            f"{row['over_cap_tokens_total']} / {row['over_cap_tokens_max']} | "
            f"{row['users_over_cap']} of {row['users']} |"
        )
    return lines


def markdown(results: dict) -> str:
    meta = results["meta"]
    lines = [
        "# capgate trilemma: lease size against real-time cost, optimality and exactness",
        "",
        f"{meta['started']}, capgate {meta['capgate']} ({meta['git']}), {meta['cores']} cores, "
        f"load average {meta['load_before']} before and {meta['load_after']} after "
        f"(the machine is shared: treat sub-millisecond differences as noise), {meta['seconds']:.0f} s.",
        "",
    ]
    if results.get("cost"):
        lines += [*cost_table(results["cost"]), ""]
    if results.get("trilemma"):
        lines += [*trilemma_table(results["trilemma"]), ""]
    lines += ["## How to read it", ""] + [f"- {note}" for note in results["notes"]]
    return "\n".join(lines) + "\n"


def _line(axis: Any, rows: list[dict], whole_at: int, value: Any, style: str, label: str) -> None:
    """One line against the lease size; the whole-request reservation sits at `whole_at`."""
    x = [whole_at if row["lease"] is None else row["lease"] for row in rows]
    axis.plot(x, [value(row) for row in rows], style, label=label)


def plot(results: dict, path: Path) -> None:
    """Four panels against the lease size (finer to the right): Redis round trips, real-time
    cost, optimality and exactness."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    cost, tri = results.get("cost"), results.get("trilemma")
    whole_at = max(([cost["stream_tokens"]] if cost else []) + ([tri["max_tokens"]] if tri else []))
    figure, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    trips, latency, optimality, exact = axes.flat
    if cost:
        rows = cost["rows"]
        _line(
            trips, rows, whole_at, lambda r: r["round_trips_per_request"], "o-", "fast upstream, full streams"
        )
        _line(
            latency,
            rows,
            whole_at,
            lambda r: r["added_duration_median_ms"],
            "o-",
            "added stream time, median",
        )
        _line(latency, rows, whole_at, lambda r: r["added_duration_p99_ms"], "o--", "added stream time, p99")
        _line(
            latency, rows, whole_at, lambda r: r["gateway_cpu_ms_per_request"], "s-", "gateway CPU / request"
        )
    if tri:
        rows = tri["rows"]

        def caps(row: dict) -> int:
            return row["cap_tokens_per_user"] * row["users"]

        _line(trips, rows, whole_at, lambda r: r["round_trips_per_request"], "s-", "vLLM, capped workload")
        _line(latency, rows, whole_at, lambda r: r["itl_p99_ms"], "^:", "vLLM time per token, p99")
        _line(
            optimality,
            rows,
            whole_at,
            lambda r: 100 * r["never_used_mean_share_of_cap"],
            "o-",
            "held and never used, mean per user",
        )
        _line(
            optimality,
            rows,
            whole_at,
            lambda r: 100 * r["unused_mean_share_of_cap"],
            "o--",
            "held and not yet received, mean per user",
        )
        _line(
            optimality,
            rows,
            whole_at,
            lambda r: 100 * r["denied_would_fit_tokens"] / caps(r),
            "s-",
            "denied tokens that would have fit",
        )
        _line(
            exact,
            rows,
            whole_at,
            lambda r: 100 * r["over_cap_tokens_total"] / caps(r),
            "o-",
            "billed over the caps (% of the caps)",
        )
        _line(
            exact,
            rows,
            whole_at,
            lambda r: 100 * r["unbilled_tokens"] / max(1, r["vllm_generated_tokens"]),
            "s-",
            "generated by vLLM, never billed (% of generated)",
        )
        _line(
            exact,
            rows,
            whole_at,
            lambda r: 100 * r["cut_at_budget"] / max(1, r["served"]),
            "^:",
            "streams cut at their budget (% of served)",
        )
    panels = (
        (trips, "Redis round trips per request", "log"),
        (latency, "real-time cost (ms)", "symlog"),
        (optimality, "optimality (% of the caps)", "linear"),
        (exact, "exactness (%)", "linear"),
    )
    leases = {r["lease"] for part in (cost, tri) if part for r in part["rows"] if r["lease"]}
    ticks = sorted({whole_at, *leases})
    for axis, title, scale in panels:
        axis.set_title(title)
        axis.set_xscale("log", base=2)
        if scale == "symlog":
            axis.set_yscale(scale, linthresh=1.0)
            if axis.lines and min(min(line.get_ydata()) for line in axis.lines) >= 0:
                axis.set_ylim(bottom=0)
        else:
            axis.set_yscale(scale)
        axis.set_xticks(ticks, [("whole" if t == whole_at else str(t)) for t in ticks])
        axis.minorticks_off()
        if scale == "log":
            axis.set_yticks(LOG_TICKS)
            axis.yaxis.set_major_formatter(ScalarFormatter())
        axis.invert_xaxis()
        axis.set_xlabel("lease size (tokens), finer to the right")
        axis.grid(True, alpha=0.3)
        if axis.lines:
            axis.legend(fontsize=8)
    figure.suptitle("capgate: granularity against real-time cost, optimality and exactness")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
