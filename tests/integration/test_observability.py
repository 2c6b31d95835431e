"""The dashboards and alerts query what really exists: a real Prometheus scrapes a real capgate and
vLLM under real traffic, and every PromQL expression of every panel and alert is asked of it.

Traffic comes in two waves (so that rates and quantiles have an increase to work on) from the
official openai SDK, with the demo keys of every tier, a user of a tiny-cap tier who is refused
(cap rejections), and a second capgate whose admission always finds vLLM saturated (sheds).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from prometheus_client.mmap_dict import MmapedDict

from policies.keys import hash_key
from tests.harness import RedisServer, VllmServer, parse, sample_sum
from tests.harness.capgate_server import CapgateServer
from tests.harness.clients import openai_client
from tests.harness.prometheus_server import PanelQuery, PrometheusServer, dashboard_queries, metric_names

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
EXAMPLE_POLICY = REPO / "deploy" / "policies" / "example.yaml"
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yml"
DASHBOARDS = REPO / "deploy" / "grafana" / "dashboards"
OVERVIEW = "capgate-overview.json"

DEMO_KEYS = {"free": "cg-demo-free", "pro": "cg-demo-pro", "enterprise": "cg-demo-enterprise"}
CAPPED_KEY = "cg-test-observability-capped"
CAPPED_USER = "obs-capped"
CAPPED_TIER = "capped"
MESSAGES = [{"role": "user", "content": "Watch the gateway."}]
SCRAPE_TIMEOUT = 60.0


@dataclass
class Observed:
    """The running stack and what the traffic produced."""

    gateways: list[CapgateServer]
    vllm: VllmServer
    prometheus: PrometheusServer
    cap_rejections: int
    sheds: int


def hostport(base_url: str) -> str:
    return base_url.split("://", 1)[1]


def write_policy(path: Path) -> Path:
    """The example policy plus a tier whose daily cap allows about one request, and its user."""
    policy = yaml.safe_load(EXAMPLE_POLICY.read_text())
    capped = json.loads(json.dumps(policy["tiers"]["free"]))
    capped["priority"] = 30
    capped["caps"]["windows"] = [{"per": "day", "tokens": 100}]
    policy["tiers"][CAPPED_TIER] = capped
    policy["users"].append({"id": CAPPED_USER, "tier": CAPPED_TIER, "keys": [hash_key(CAPPED_KEY)]})
    path.write_text(yaml.safe_dump(policy, sort_keys=False))
    return path


def exported_names(metrics_text: str) -> set[str]:
    """Sample names on a /metrics page, plus those its TYPE lines promise for series not yet seen."""
    names = {name for name, _ in parse(metrics_text)}
    for line in metrics_text.splitlines():
        if not line.startswith("# TYPE "):
            continue
        _, _, name, kind = line.split()
        names.add(name)
        if kind == "counter":
            names.add(name if name.endswith("_total") else f"{name}_total")
        elif kind == "histogram":
            names.update({f"{name}_bucket", f"{name}_sum", f"{name}_count"})
    return names


def metrics_text(base_url: str) -> str:
    reply = httpx.get(f"{base_url}/metrics", timeout=10)
    reply.raise_for_status()
    return reply.text


def served_requests(gateway: CapgateServer) -> None:
    """A streamed chat, a unary chat and a completion for every demo tier."""
    for key in DEMO_KEYS.values():
        client = openai_client(gateway.base_url, key)
        stream = client.chat.completions.create(
            model="tiny",
            messages=MESSAGES,
            max_tokens=16,
            stream=True,
            stream_options={"include_usage": True},
        )
        usage = [chunk.usage for chunk in stream if chunk.usage is not None]
        assert usage and usage[-1].completion_tokens > 1
        client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=8)
        client.completions.create(model="tiny", prompt="Tokens are metered", max_tokens=8)


def refused_for_cap(gateway: CapgateServer) -> int:
    """Send requests of the capped user until one is refused for its cap; return 1."""
    client = openai_client(gateway.base_url, CAPPED_KEY)
    for _ in range(10):
        try:
            client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=16)
        except openai.RateLimitError as exc:
            assert exc.code == "cap_exceeded", exc
            return 1
    pytest.fail("the capped user was never refused")


def shed(gateway: CapgateServer) -> int:
    """Send free-tier requests to the saturated gateway until one is shed; return 1.

    Admission forwards everything until it has read vLLM's load once, so the first tries may pass.
    """
    client = openai_client(gateway.base_url, DEMO_KEYS["free"])
    for _ in range(20):
        try:
            client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4)
        except openai.RateLimitError as exc:
            assert exc.code == "server_overloaded", exc
            return 1
        time.sleep(0.5)
    pytest.fail("the saturated gateway never shed a request")


def scalar(prometheus: PrometheusServer, expr: str) -> float | None:
    result = prometheus.query(expr)["result"]
    return float(result[0]["value"][1]) if result else None


def wait_until_scraped(prometheus: PrometheusServer, gateways: list[CapgateServer], vllm: VllmServer) -> None:
    """Wait until Prometheus holds the counters' current values of every capgate and of vLLM."""
    requests = sum(sample_sum(parse(metrics_text(g.base_url)), "capgate_requests_total") for g in gateways)
    generated = sample_sum(vllm.metrics(), "vllm:generation_tokens_total")
    prometheus.wait_until(
        lambda: (
            scalar(prometheus, "sum(capgate_requests_total)") == requests
            and scalar(prometheus, "sum(vllm:generation_tokens_total)") == generated
        ),
        SCRAPE_TIMEOUT,
        what=f"Prometheus to scrape {requests} capgate requests and {generated} vLLM tokens",
    )


@pytest.fixture(scope="module")
def observed(
    tmp_path_factory: pytest.TempPathFactory, vllm_server: VllmServer, redis_server: RedisServer
) -> Iterator[Observed]:
    workdir = tmp_path_factory.mktemp("observability")
    policy = write_policy(workdir / "policy.yaml")
    common = {"upstreams": [vllm_server.base_url], "redis_url": redis_server.url, "policy": policy}
    with contextlib.ExitStack() as stack:
        gateway = CapgateServer(workdir / "gateway", **common)
        saturated = CapgateServer(
            workdir / "saturated",
            settings={"admission": {"max_waiting": 0, "queue_timeout_s": 0.3}},
            **common,
        )
        for server in (gateway, saturated):
            stack.callback(server.stop)
            server.start()
        prometheus = PrometheusServer(
            {
                "capgate": [hostport(gateway.base_url), hostport(saturated.base_url)],
                "vllm": [hostport(vllm_server.base_url)],
            },
            rule_files=[ALERTS],
        )
        stack.callback(prometheus.close)
        prometheus.start()

        cap_rejections = sheds = 0
        for _ in range(2):
            served_requests(gateway)
            cap_rejections += refused_for_cap(gateway)
            sheds += shed(saturated)
            wait_until_scraped(prometheus, [gateway, saturated], vllm_server)
        yield Observed([gateway, saturated], vllm_server, prometheus, cap_rejections, sheds)


def all_dashboards() -> dict[str, dict[str, Any]]:
    return {path.name: json.loads(path.read_text()) for path in sorted(DASHBOARDS.glob("*.json"))}


def all_alert_rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def referenced_names() -> set[str]:
    names = {
        name
        for dashboard in all_dashboards().values()
        for query in dashboard_queries(dashboard)
        for name in metric_names(query.expr)
    }
    return names | {name for rule in all_alert_rules() for name in metric_names(rule["expr"])}


def finite_values(data: dict[str, Any]) -> list[float]:
    if data["resultType"] == "scalar":
        values = [float(data["result"][1])]
    else:
        values = [float(series["value"][1]) for series in data["result"]]
    return [value for value in values if math.isfinite(value)]


def test_prometheus_scrapes_every_target(observed: Observed) -> None:
    targets = observed.prometheus.api("targets")["activeTargets"]
    assert sorted((t["labels"]["job"], t["health"]) for t in targets) == [
        ("capgate", "up"),
        ("capgate", "up"),
        ("vllm", "up"),
    ]


def test_capgate_exports_every_metric_dashboards_and_alerts_name(observed: Observed) -> None:
    exported = set().union(*(exported_names(metrics_text(g.base_url)) for g in observed.gateways))
    exporter_only = {
        "capgate_ledger_backlog_events",
        "capgate_ledger_backlog_max_events",
        "capgate_ledger_export_errors_total",
    }  # `capgate exporter`'s, test_deploy_files checks them
    wanted = {name for name in referenced_names() if name.startswith("capgate_")} - exporter_only
    assert len(wanted) >= 15
    assert sorted(wanted - exported) == []


def test_vllm_exports_every_metric_its_dashboard_names(observed: Observed) -> None:
    reply = httpx.get(f"{observed.vllm.base_url}/metrics", timeout=10)
    exported = exported_names(reply.text)
    wanted = {name for name in referenced_names() if name.startswith("vllm:")}
    assert len(wanted) >= 5
    assert sorted(wanted - exported) == []


def test_every_dashboard_query_evaluates_and_the_overview_has_data(observed: Observed) -> None:
    assert observed.cap_rejections == observed.sheds == 2
    empty_on_overview: list[PanelQuery] = []
    evaluated = 0
    for file_name, dashboard in all_dashboards().items():
        for query in dashboard_queries(dashboard):
            data = observed.prometheus.query(query.expr)
            evaluated += 1
            if file_name == OVERVIEW and not finite_values(data):
                empty_on_overview.append(query)
    assert evaluated >= 30
    assert empty_on_overview == []


def test_every_alert_expression_evaluates_and_nothing_fires(observed: Observed) -> None:
    prometheus = observed.prometheus
    rules = all_alert_rules()
    for rule in rules:
        prometheus.query(rule["expr"])

    def evaluated_cleanly() -> bool:
        groups = prometheus.api("rules")["groups"]
        loaded = [rule for group in groups for rule in group["rules"]]
        return len(loaded) == len(rules) and all(rule["health"] == "ok" for rule in loaded)

    prometheus.wait_until(evaluated_cleanly, SCRAPE_TIMEOUT, what="every alert rule evaluated with health ok")
    active = [alert["labels"]["alertname"] for alert in prometheus.api("alerts")["alerts"]]
    assert "CapgateDown" not in active and "VllmDown" not in active


def worker_request_counts(multiproc_dir: Path) -> dict[str, float]:
    """capgate_requests counted by each worker process, from its multiprocess file."""
    counts: dict[str, float] = {}
    for path in multiproc_dir.glob("counter_*.db"):
        total = sum(
            value
            for key, value, _, _ in MmapedDict.read_all_values_from_file(str(path))
            if json.loads(key)[0] == "capgate_requests"
        )
        if total:
            counts[path.stem.removeprefix("counter_")] = total
    return counts


def test_two_workers_count_every_request_exactly_once(
    tmp_path: Path, vllm_server: VllmServer, redis_server: RedisServer
) -> None:
    requests = 30
    multiproc_dir = tmp_path / "multiproc"
    multiproc_dir.mkdir()
    gateway = CapgateServer(
        tmp_path / "gateway",
        upstreams=[vllm_server.base_url],
        redis_url=redis_server.url,
        workers=2,
        env={"PROMETHEUS_MULTIPROC_DIR": str(multiproc_dir)},
    )
    try:
        gateway.start()

        def one_request(index: int) -> None:
            with openai_client(gateway.base_url, DEMO_KEYS["enterprise"]) as client:
                client.completions.create(model="tiny", prompt=f"request {index}", max_tokens=2)

        with ThreadPoolExecutor(max_workers=6) as pool:
            list(pool.map(one_request, range(requests)))

        per_worker = worker_request_counts(multiproc_dir)
        print(f"\nrequests per worker process: {per_worker}")
        assert len(per_worker) == 2, "both workers must have served requests for this test to mean anything"
        for _ in range(6):
            samples = parse(metrics_text(gateway.base_url))
            assert sample_sum(samples, "capgate_requests_total") == requests
            assert sample_sum(samples, "capgate_requests_total", {"outcome": "ok"}) == requests
    finally:
        gateway.stop()


def timings(header: str) -> dict[str, float]:
    """The durations (ms) of a `Server-Timing` header, by name."""
    entries = {}
    for entry in header.split(","):
        name, *params = (part.strip() for part in entry.split(";"))
        durations = [float(p[4:]) for p in params if p.startswith("dur=")]
        assert len(durations) == 1, header
        entries[name] = durations[0]
    return entries


def test_every_generation_response_tells_capgates_own_time_apart_from_the_upstreams(
    observed: Observed,
) -> None:
    """Unary and streamed answers carry capgate's time before the upstream, the upstream's wait and
    capgate's total, which add up within what the client waited; a refusal carries capgate's."""
    gateway = observed.gateways[0]
    client = openai_client(gateway.base_url, next(iter(DEMO_KEYS.values())))
    unary_began = time.monotonic()
    unary = client.chat.completions.with_raw_response.create(model="tiny", messages=MESSAGES, max_tokens=8)
    unary_ms = (time.monotonic() - unary_began) * 1000
    unary.parse()
    with client.chat.completions.with_streaming_response.create(
        model="tiny", messages=MESSAGES, max_tokens=8, stream=True
    ) as streamed:
        stream_header = streamed.headers["server-timing"]
        assert any(line.startswith("data: [DONE]") for line in streamed.iter_lines())
    for header, waited_ms in ((unary.headers["server-timing"], unary_ms), (stream_header, None)):
        found = timings(header)
        assert set(found) == {"capgate-pre", "upstream", "capgate"}, header
        assert 0 < found["capgate-pre"] <= found["capgate"], header
        assert found["upstream"] > 0, header
        if waited_ms is not None:
            assert found["capgate"] + found["upstream"] <= waited_ms, (header, waited_ms)
    refused = httpx.post(
        f"{gateway.base_url}/v1/chat/completions",
        json={"model": "tiny", "messages": MESSAGES},
        headers={"authorization": "Bearer sk-nobody"},
        timeout=10,
    )
    assert refused.status_code == 401
    assert set(timings(refused.headers["server-timing"])) == {"capgate"}
