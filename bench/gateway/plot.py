"""The plot: latency against concurrency, a row per upstream and a column per workload, a line per
path (median solid, p99 dashed). Streams show time to first token, other workloads the request's
whole latency. Run where matplotlib is installed: `python -m bench.gateway.plot RESULTS_JSON PNG`."""

import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import NullLocator

COLORS = {"direct": "tab:gray", "nginx": "tab:green", "capgate": "tab:blue", "litellm": "tab:orange"}


def _panel(axis: Any, table: list[dict[str, Any]], upstream: str, workload: str) -> None:
    stream = any("ttft_median_us" in e for e in table if e["workload"] == workload)
    median, p99 = ("ttft_median_us", "ttft_p99_us") if stream else ("latency_median_us", "latency_p99_us")
    if not any((e["upstream"], e["workload"]) == (upstream, workload) for e in table):
        axis.set_axis_off()
        axis.text(
            0.5, 0.5, f"{workload}: not run on the {upstream} upstream", ha="center", transform=axis.transAxes
        )
        return
    for path, color in COLORS.items():
        rows = sorted(
            (e for e in table if (e["upstream"], e["workload"], e["path"]) == (upstream, workload, path)),
            key=lambda e: e["concurrency"],
        )
        rows = [e for e in rows if e.get(median) is not None]
        if not rows:
            continue
        levels = [e["concurrency"] for e in rows]
        axis.plot(levels, [e[median] / 1000 for e in rows], "o-", color=color, label=f"{path} median")
        axis.plot(levels, [e[p99] / 1000 for e in rows], "--", color=color, alpha=0.6, label=f"{path} p99")
    axis.set_xscale("log")
    axis.xaxis.set_minor_locator(NullLocator())
    axis.set_yscale("log")
    levels = sorted({e["concurrency"] for e in table if e["upstream"] == upstream})
    axis.set_xticks(levels, [str(level) for level in levels])
    axis.set_title(f"{workload} — {upstream} upstream", fontsize=10)
    axis.set_xlabel("concurrent requests")
    axis.set_ylabel("time to first token (ms)" if stream else "request latency (ms)")
    axis.grid(True, which="both", alpha=0.3)


def plot(results: dict[str, Any], out: Path) -> None:
    table = results["cells"]
    upstreams = list(results["upstreams"])
    workloads = results["workloads"]
    figure, axes = plt.subplots(
        len(upstreams), len(workloads), figsize=(4.4 * len(workloads), 3.8 * len(upstreams)), squeeze=False
    )
    for row, upstream in enumerate(upstreams):
        for column, workload in enumerate(workloads):
            _panel(axes[row][column], table, upstream, workload)
    axes[0][0].legend(fontsize=7)
    figure.suptitle("capgate vs direct, nginx and LiteLLM: latency against load", fontsize=11)
    figure.tight_layout()
    figure.savefig(out, dpi=110)


def main(argv: list[str]) -> int:
    results, out = argv
    plot(json.loads(Path(results).read_text()), Path(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
