"""The deployment files say what the code does: metric names, service wiring, probes, schemas.

External checkers run when present and skip otherwise: ``promtool`` (Debian's ``prometheus``
package) and ``kubernetes-validate`` (PyPI, bundles the Kubernetes JSON schemas).
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY

import proxy.exporter
import proxy.metrics  # noqa: F401  (registers capgate's metrics)
from policies.loader import load_policy
from proxy.settings import load_settings
from tests.harness.prometheus_server import dashboard_panels, dashboard_queries, metric_names

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARDS = DEPLOY / "grafana" / "dashboards"
PROVISIONING = DEPLOY / "grafana" / "provisioning"
K8S = DEPLOY / "k8s"
EXAMPLE_POLICY = DEPLOY / "policies" / "example.yaml"
COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = DEPLOY / "Dockerfile"

UNBOUNDED_LABELS = {"user", "user_id", "key", "api_key", "request_id"}
REQUIRED_ALERTS = {
    "CapgateDown",
    "CapgateRedisErrors",
    "CapgateUpstreamErrors",
    "CapgateLedgerSpoolGrowing",
    "CapgateEnterpriseTTFTAboveObjective",
    "CapgateAdmissionDegraded",
    "CapgateTTFTObjectiveUnattainable",
    "CapgateLedgerBacklog",
    "CapgateExporterDown",
}


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def load_yaml_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def capgate_collectors() -> dict[str, Any]:
    """capgate's metric objects in the default registry, by name."""
    names = REGISTRY._collector_to_names
    return {
        collector._name: collector
        for collector in names
        if getattr(collector, "_name", "").startswith("capgate_")
    }


def capgate_sample_names() -> set[str]:
    """Every sample name capgate can expose (``_total``, ``_bucket``, ``_sum``, ``_count``...)."""
    names = REGISTRY._collector_to_names
    return {name for collector in capgate_collectors().values() for name in names[collector]}


def dashboards() -> dict[str, dict[str, Any]]:
    return {path.name: json.loads(path.read_text()) for path in sorted(DASHBOARDS.glob("*.json"))}


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(ALERTS)["groups"] for rule in group["rules"]]


def compose() -> dict[str, Any]:
    return load_yaml(COMPOSE)


def k8s_documents() -> dict[str, list[dict[str, Any]]]:
    return {
        path.name: load_yaml_documents(path)
        for path in sorted(K8S.glob("*.yaml"))
        if path.name != "kustomization.yaml"
    }


def k8s_object(kind: str, name: str) -> dict[str, Any]:
    for documents in k8s_documents().values():
        for document in documents:
            if document["kind"] == kind and document["metadata"]["name"] == name:
                return document
    raise AssertionError(f"no {kind} {name} in {K8S}")


def container(pod_owner: dict[str, Any], name: str) -> dict[str, Any]:
    containers = pod_owner["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == name)


# --- metrics: labels stay bounded, names in dashboards and alerts exist ---------------------


def test_capgate_metrics_have_no_per_user_or_per_request_labels() -> None:
    collectors = capgate_collectors()
    assert len(collectors) >= 15, sorted(collectors)
    offending = {
        name: sorted(set(collector._labelnames) & UNBOUNDED_LABELS)
        for name, collector in collectors.items()
        if set(collector._labelnames) & UNBOUNDED_LABELS
    }
    assert offending == {}


def test_every_capgate_metric_in_dashboards_and_alerts_is_defined() -> None:
    defined = capgate_sample_names()
    referenced: dict[str, set[str]] = {}
    for file_name, dashboard in dashboards().items():
        for query in dashboard_queries(dashboard):
            referenced.setdefault(file_name, set()).update(metric_names(query.expr))
    for rule in alert_rules():
        referenced.setdefault("alerts.yml", set()).update(metric_names(rule["expr"]))
    unknown = {
        source: sorted(name for name in names if name.startswith("capgate_") and name not in defined)
        for source, names in referenced.items()
    }
    assert {source: names for source, names in unknown.items() if names} == {}
    assert any(name.startswith("vllm:") for name in referenced["vllm.json"])


# --- Grafana --------------------------------------------------------------------------------


def test_dashboards_are_well_formed() -> None:
    boards = dashboards()
    assert set(boards) == {"capgate-overview.json", "capgate-health.json", "vllm.json"}
    assert len({board["uid"] for board in boards.values()}) == len(boards)
    for file_name, board in boards.items():
        panels = dashboard_panels(board)
        assert panels, file_name
        assert len({panel["id"] for panel in board["panels"]}) == len(board["panels"]), file_name
        for panel in panels:
            assert panel.get("targets"), f"{file_name}: panel {panel['title']!r} has no query"
            assert all(t.get("expr") for t in panel["targets"]), f"{file_name}: {panel['title']!r}"
            grid = panel["gridPos"]
            assert grid["x"] + grid["w"] <= 24, f"{file_name}: {panel['title']!r} is too wide"
        for query in dashboard_queries(board):
            assert "$" not in query.expr, f"{file_name}: unsubstituted variable in {query.expr!r}"


def test_overview_has_the_panels_an_operator_needs() -> None:
    board = dashboards()["capgate-overview.json"]
    exprs = " ".join(query.expr for query in dashboard_queries(board))
    for metric in (
        "capgate_tokens_total",
        "capgate_value_total",
        "capgate_requests_total",
        "capgate_time_to_first_token_seconds_bucket",
        "capgate_inter_token_latency_seconds_bucket",
        "capgate_cap_rejections_total",
        "capgate_admission_shed_total",
    ):
        assert metric in exprs, metric
    for quantile in ("histogram_quantile(0.5,", "histogram_quantile(0.99,"):
        assert quantile in exprs
    raw = json.dumps(board)
    assert 'tier=~\\"$tier\\"' in raw, "tier filters must be regex matches so that All (.*) works"


def test_health_and_vllm_dashboards_cover_their_topics() -> None:
    boards = dashboards()
    health = " ".join(q.expr for q in dashboard_queries(boards["capgate-health.json"]))
    for metric in (
        "capgate_added_latency_seconds_bucket",
        "capgate_own_time_seconds_bucket",
        "capgate_redis_call_seconds_bucket",
        "capgate_redis_errors_total",
        "capgate_reservations_outstanding",
        "capgate_spool_bytes",
        "capgate_upstream_errors_total",
        "capgate_policy_reloads_total",
        "capgate_admission_degraded",
    ):
        assert metric in health, metric
    vllm = " ".join(q.expr for q in dashboard_queries(boards["vllm.json"]))
    for metric in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:time_to_first_token_seconds_bucket",
        "vllm:generation_tokens_total",
    ):
        assert metric in vllm, metric


def test_grafana_provisioning_matches_dashboards_and_compose() -> None:
    datasource = load_yaml(PROVISIONING / "datasources" / "prometheus.yaml")["datasources"][0]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    for board in dashboards().values():
        variables = {v["name"]: v for v in board["templating"]["list"]}
        assert variables["datasource"]["current"]["value"] == datasource["uid"]
    provider = load_yaml(PROVISIONING / "dashboards" / "capgate.yaml")["providers"][0]
    grafana = compose()["services"]["grafana"]
    mounts = dict(volume.split(":")[:2] for volume in grafana["volumes"] if volume.startswith("./"))
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider['options']['path']}/capgate-overview.json"


# --- Prometheus -----------------------------------------------------------------------------


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus)")
    return subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60)


def test_promtool_accepts_config_and_rules() -> None:
    config = run_promtool("check", "config", str(PROMETHEUS_CONFIG))
    assert config.returncode == 0, config.stdout + config.stderr
    rules = run_promtool("check", "rules", str(ALERTS))
    assert rules.returncode == 0, rules.stdout + rules.stderr


def test_alert_rules_cover_what_an_operator_must_hear() -> None:
    rules = {rule["alert"]: rule for rule in alert_rules()}
    assert set(rules) >= REQUIRED_ALERTS
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name


def test_ttft_alert_watches_the_top_tier_at_its_objective() -> None:
    policy = load_policy(EXAMPLE_POLICY.read_text(), str(EXAMPLE_POLICY))
    top_name, top = min(policy.tiers.items(), key=lambda item: item[1].priority)
    expr = next(r["expr"] for r in alert_rules() if r["alert"] == "CapgateEnterpriseTTFTAboveObjective")
    assert f'tier="{top_name}"' in expr
    threshold = re.search(r">\s*([0-9.]+)\s*$", expr.strip())
    assert threshold is not None and float(threshold[1]) == top.ttft_objective_s


PROMTOOL_RULE_TESTS = """
rule_files: [{alerts}]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      # enterprise first tokens: 0.8 s for 10 minutes (above the 0.5 s objective)
      - series: 'capgate_time_to_first_token_seconds_bucket{{job="capgate",tier="enterprise",le="0.5"}}'
        values: '0+0x15'
      - series: 'capgate_time_to_first_token_seconds_bucket{{job="capgate",tier="enterprise",le="1"}}'
        values: '0+60x15'
      - series: 'capgate_time_to_first_token_seconds_bucket{{job="capgate",tier="enterprise",le="+Inf"}}'
        values: '0+60x15'
      # pro is slow too, but pro has no objective
      - series: 'capgate_time_to_first_token_seconds_bucket{{job="capgate",tier="pro",le="0.5"}}'
        values: '0+0x15'
      - series: 'capgate_time_to_first_token_seconds_bucket{{job="capgate",tier="pro",le="+Inf"}}'
        values: '0+60x15'
      - series: 'capgate_redis_errors_total{{job="capgate",instance="a",operation="reserve"}}'
        values: '0+5x15'
      - series: 'capgate_spool_bytes{{job="capgate",instance="a"}}'
        values: '0+1000x15'
      - series: 'capgate_admission_degraded{{job="capgate",instance="a"}}'
        values: '1x15'
      - series: 'capgate_ttft_objective_unattainable{{job="capgate",instance="a",tier="enterprise"}}'
        values: '1x15'
      - series: 'up{{job="capgate",instance="a"}}'
        values: '0x15'
      - series: 'up{{job="capgate-exporter",instance="x"}}'
        values: '0x15'
      - series: 'capgate_ledger_backlog_events{{job="capgate-exporter",instance="x"}}'
        values: '200000x15'
      - series: 'capgate_ledger_backlog_max_events{{job="capgate-exporter",instance="x"}}'
        values: '100000x15'
    alert_rule_test:
      - eval_time: 12m
        alertname: CapgateExporterDown
        exp_alerts:
          - exp_labels: {{severity: critical, job: capgate-exporter, instance: x}}
      - eval_time: 12m
        alertname: CapgateLedgerBacklog
        exp_alerts:
          - exp_labels: {{severity: warning, instance: x}}
      - eval_time: 12m
        alertname: CapgateEnterpriseTTFTAboveObjective
        exp_alerts:
          - exp_labels: {{severity: warning}}
      - eval_time: 12m
        alertname: CapgateRedisErrors
        exp_alerts:
          - exp_labels: {{severity: critical, instance: a, operation: reserve}}
      - eval_time: 12m
        alertname: CapgateLedgerSpoolGrowing
        exp_alerts:
          - exp_labels: {{severity: critical, job: capgate, instance: a}}
      - eval_time: 12m
        alertname: CapgateAdmissionDegraded
        exp_alerts:
          - exp_labels: {{severity: warning, instance: a}}
      - eval_time: 12m
        alertname: CapgateDown
        exp_alerts:
          - exp_labels: {{severity: critical, job: capgate, instance: a}}
      - eval_time: 12m
        alertname: CapgateTTFTObjectiveUnattainable
        exp_alerts:
          - exp_labels: {{severity: warning, tier: enterprise}}
  - interval: 1m
    input_series:
      # enterprise first tokens at 0.2 s: within the objective, no alert
      - series: 'capgate_time_to_first_token_seconds_bucket{{job="capgate",tier="enterprise",le="0.25"}}'
        values: '0+60x15'
      - series: 'capgate_time_to_first_token_seconds_bucket{{job="capgate",tier="enterprise",le="0.5"}}'
        values: '0+60x15'
      - series: 'capgate_time_to_first_token_seconds_bucket{{job="capgate",tier="enterprise",le="+Inf"}}'
        values: '0+60x15'
      - series: 'capgate_spool_bytes{{job="capgate",instance="a"}}'
        values: '0x15'
      - series: 'capgate_admission_degraded{{job="capgate",instance="a"}}'
        values: '0x15'
      - series: 'up{{job="capgate",instance="a"}}'
        values: '1x15'
      - series: 'up{{job="vllm",instance="v"}}'
        values: '1x15'
      - series: 'up{{job="capgate-exporter",instance="x"}}'
        values: '1x15'
      - series: 'capgate_ledger_backlog_events{{job="capgate-exporter",instance="x"}}'
        values: '500x15'
      - series: 'capgate_ledger_backlog_max_events{{job="capgate-exporter",instance="x"}}'
        values: '100000x15'
    alert_rule_test:
      - eval_time: 12m
        alertname: CapgateExporterDown
        exp_alerts: []
      - eval_time: 12m
        alertname: CapgateLedgerBacklog
        exp_alerts: []
      - eval_time: 12m
        alertname: CapgateEnterpriseTTFTAboveObjective
        exp_alerts: []
      - eval_time: 12m
        alertname: CapgateLedgerSpoolGrowing
        exp_alerts: []
      - eval_time: 12m
        alertname: CapgateAdmissionDegraded
        exp_alerts: []
      - eval_time: 12m
        alertname: CapgateDown
        exp_alerts: []
      - eval_time: 12m
        alertname: VllmDown
        exp_alerts: []
"""


def test_alerts_fire_on_trouble_and_stay_quiet_otherwise(tmp_path: Path) -> None:
    rules = load_yaml(ALERTS)
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations")  # promtool compares annotations too; expressions are the point
    alerts = tmp_path / "alerts.yml"
    alerts.write_text(yaml.safe_dump(rules))
    tests = tmp_path / "alerts_test.yml"
    tests.write_text(PROMTOOL_RULE_TESTS.format(alerts=json.dumps(str(alerts))))
    result = run_promtool("test", "rules", str(tests))
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_scrapes_the_compose_services() -> None:
    config = load_yaml(PROMETHEUS_CONFIG)
    targets = {
        job["job_name"]: [t for sc in job["static_configs"] for t in sc["targets"]]
        for job in config["scrape_configs"]
    }
    assert targets == {
        "capgate": ["capgate:8000"],
        "capgate-exporter": ["exporter:9108"],
        "vllm": ["vllm:8000"],
    }
    services = compose()["services"]
    capgate_port = services["capgate"]["ports"][0].split(":")[-1]
    vllm_command = services["vllm"]["command"]
    vllm_port = vllm_command[vllm_command.index("--port") + 1]
    assert targets["capgate"] == [f"capgate:{capgate_port}"]
    assert targets["vllm"] == [f"vllm:{vllm_port}"]
    for rule_file in config["rule_files"]:
        assert (PROMETHEUS_CONFIG.parent / rule_file).is_file()
    mounts = services["prometheus"]["volumes"]
    assert "./deploy/prometheus:/etc/prometheus:ro" in mounts
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]


# --- docker compose and the image -----------------------------------------------------------


def test_compose_wires_the_services_by_name() -> None:
    services = compose()["services"]
    assert {"vllm", "redis", "capgate", "prometheus", "grafana"} <= set(services)

    vllm = services["vllm"]
    assert vllm["image"].startswith("vllm/vllm-openai:")
    command = vllm["command"]
    assert command[command.index("--model") + 1] == "${MODEL:-Qwen/Qwen2.5-0.5B-Instruct}"
    assert "--served-model-name" in command
    assert command[command.index("--scheduling-policy") + 1] == "priority"
    devices = vllm["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert "python3" in vllm["healthcheck"]["test"] and "/health" in " ".join(vllm["healthcheck"]["test"])

    redis = services["redis"]
    assert redis["command"][redis["command"].index("--appendonly") + 1] == "yes"
    assert any(volume.endswith(":/data") for volume in redis["volumes"])
    assert "redis-cli" in redis["healthcheck"]["test"]

    capgate = services["capgate"]
    assert capgate["build"] == {"context": ".", "dockerfile": "deploy/Dockerfile"}
    env = capgate["environment"]
    assert env["CAPGATE_UPSTREAMS"] == "http://vllm:8000"
    assert env["CAPGATE_REDIS_URL"] == "redis://redis:6379/0"
    assert "./deploy/policies:/etc/capgate/policies:ro" in capgate["volumes"]
    assert env["CAPGATE_POLICY_FILE"] == "/etc/capgate/policies/example.yaml"
    assert "8000:8000" in capgate["ports"]
    assert capgate["depends_on"]["redis"]["condition"] == "service_healthy"
    assert capgate["depends_on"]["vllm"]["condition"] == "service_healthy"

    settings = load_settings(env={k: str(v) for k, v in env.items()})
    assert [u.url for u in settings.upstreams] == ["http://vllm:8000"]
    assert settings.redis_url == "redis://redis:6379/0"

    exporter = services["exporter"]
    assert exporter["image"] == capgate["image"] and exporter["command"] == ["capgate", "exporter"]
    assert exporter["depends_on"]["postgres"]["condition"] == "service_healthy"
    exported = load_settings(env={k: str(v) for k, v in exporter["environment"].items()})
    assert exported.exporter.sink.kind == "postgres" and "@postgres:5432/" in exported.exporter.sink.dsn
    assert exported.redis_url == settings.redis_url and exported.exporter.metrics_host == "0.0.0.0"
    assert services["postgres"]["environment"]["POSTGRES_DB"] == "capgate"

    assert "9090:9090" in services["prometheus"]["ports"]
    assert "3000:3000" in services["grafana"]["ports"]
    assert services["grafana"]["environment"]["GF_SECURITY_ADMIN_USER"] == "admin"
    named_volumes = set(compose()["volumes"])
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert source.startswith("./") or source in named_volumes, volume
            if source.startswith("./"):
                assert (REPO / source).exists(), volume


def test_dockerfile_builds_a_non_root_capgate_image() -> None:
    lines = [line.strip() for line in DOCKERFILE.read_text().splitlines()]
    instructions = [line for line in lines if line and not line.startswith("#")]
    assert instructions[0] == "FROM python:3.11-slim"
    assert any(re.match(r"RUN pip install \.(\s|$)", line) for line in instructions)
    users = [line.split()[1] for line in instructions if line.startswith("USER ")]
    assert users and users[-1] not in {"root", "0"}
    assert "EXPOSE 8000" in instructions
    assert instructions[-1] == 'CMD ["capgate", "serve", "--host", "0.0.0.0", "--port", "8000"]'
    healthcheck = DOCKERFILE.read_text().split("HEALTHCHECK", 1)[1].split("\nCMD", 1)[0]
    assert "/healthz" in healthcheck


def test_docker_build_context_has_what_the_dockerfile_copies() -> None:
    included = {
        line[1:].rstrip("/")
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    for line in DOCKERFILE.read_text().splitlines():
        if not line.startswith("COPY "):
            continue
        sources = line.split()[1:-1]
        for source in sources:
            assert source.rstrip("/") in included, f"{source} is excluded by .dockerignore"
            assert (REPO / source).exists(), f"{source} is copied by the Dockerfile but missing"


# --- Kubernetes -----------------------------------------------------------------------------


def test_kustomization_lists_every_manifest() -> None:
    kustomization = load_yaml(K8S / "kustomization.yaml")
    assert sorted(kustomization["resources"]) == sorted(k8s_documents())


@pytest.mark.parametrize("kubernetes_version", ["1.30.0", "latest"])
def test_kubernetes_manifests_pass_schema_validation(kubernetes_version: str) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    version = kubernetes_validate.latest_version() if kubernetes_version == "latest" else kubernetes_version
    validated = []
    for file_name, documents in k8s_documents().items():
        for document in documents:
            try:
                kubernetes_validate.validate(document, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{file_name}: {document['kind']}: {exc.message} at {list(exc.path)}")
            validated.append(document["kind"])
    assert {"Deployment", "Service", "ConfigMap", "PodDisruptionBudget"} <= set(validated)
    assert {"HorizontalPodAutoscaler", "StatefulSet"} <= set(validated)

    broken = copy.deepcopy(k8s_object("Deployment", "capgate"))
    broken["spec"]["replcas"] = 3
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, version, strict=True)


def test_capgate_deployment_probes_resources_and_config() -> None:
    deployment = k8s_object("Deployment", "capgate")
    assert deployment["spec"]["replicas"] == 3
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    gateway = container(deployment, "capgate")
    assert gateway["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert gateway["readinessProbe"]["httpGet"]["path"] == "/readyz"
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(gateway["resources"][kind])
    env = {item["name"]: item["value"] for item in gateway["env"]}

    config_map = k8s_object("ConfigMap", "capgate-config")
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    mount = next(m for m in gateway["volumeMounts"] if volumes[m["name"]].get("configMap"))
    assert volumes[mount["name"]]["configMap"]["name"] == "capgate-config"
    assert "subPath" not in mount, "a subPath mount never sees ConfigMap updates (policy reloads)"
    files = {f"{mount['mountPath']}/{key}": text for key, text in config_map["data"].items()}
    assert env["CAPGATE_CONFIG"] in files and env["CAPGATE_POLICY_FILE"] in files

    assert files[env["CAPGATE_POLICY_FILE"]] == EXAMPLE_POLICY.read_text(), (
        "the ConfigMap's policy.yaml must be deploy/policies/example.yaml verbatim"
    )
    settings_path = Path(mount["mountPath"]) / "capgate.yaml"
    settings_data = yaml.safe_load(files[str(settings_path)])
    service_names = {
        doc["metadata"]["name"]: doc
        for docs in k8s_documents().values()
        for doc in docs
        if doc["kind"] == "Service"
    }
    for upstream in settings_data["upstreams"]:
        host, port = re.match(r"https?://([^:/]+):(\d+)", upstream["url"]).groups()
        assert int(port) in {p["port"] for p in service_names[host]["spec"]["ports"]}
    redis_host, redis_port = re.match(r"rediss?://([^:/]+):(\d+)", settings_data["redis_url"]).groups()
    assert int(redis_port) in {p["port"] for p in service_names[redis_host]["spec"]["ports"]}

    service = k8s_object("Service", "capgate")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    pdb = k8s_object("PodDisruptionBudget", "capgate")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pdb["spec"]["minAvailable"] < deployment["spec"]["replicas"]
    hpa = k8s_object("HorizontalPodAutoscaler", "capgate")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "capgate"}
    assert hpa["spec"]["minReplicas"] == deployment["spec"]["replicas"]
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]


def test_redis_persists_and_vllm_runs_the_official_image_on_a_gpu() -> None:
    redis = k8s_object("StatefulSet", "redis")
    redis_args = container(redis, "redis")["args"]
    assert redis_args[redis_args.index("--appendonly") + 1] == "yes"
    assert redis["spec"]["volumeClaimTemplates"]

    vllm = k8s_object("Deployment", "vllm")
    server = container(vllm, "vllm")
    assert server["image"].startswith("vllm/vllm-openai:")
    assert server["args"][server["args"].index("--scheduling-policy") + 1] == "priority"
    assert server["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_exporter_deployment_reads_the_gateways_settings_and_its_database_from_a_secret() -> None:
    deployment = k8s_object("Deployment", "capgate-exporter")
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"
    exporter = container(deployment, "exporter")
    assert exporter["args"] == ["capgate", "exporter"]
    env = {item["name"]: item for item in exporter["env"]}
    assert env["CAPGATE_EXPORTER__SINK__DSN"]["valueFrom"]["secretKeyRef"] == {
        "name": "capgate-exporter",
        "key": "dsn",
    }
    config_map = k8s_object("ConfigMap", "capgate-config")
    values = {name: item["value"] for name, item in env.items() if "value" in item}
    values["CAPGATE_EXPORTER__SINK__DSN"] = "postgresql://capgate:secret@postgres:5432/capgate"
    with_file = {**values, "CAPGATE_CONFIG": ""}
    settings = load_settings(env=with_file)
    assert settings.exporter.sink.kind == "postgres" and (
        settings.exporter.shard,
        settings.exporter.shards,
    ) == (0, 1)
    port = int(deployment["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"])
    assert port == settings.exporter.metrics_port == exporter["ports"][0]["containerPort"]
    redis_url = yaml.safe_load(config_map["data"]["capgate.yaml"])["redis_url"]
    assert redis_url.startswith("redis://redis:")
