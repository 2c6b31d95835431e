"""A real ``prometheus`` server on a loopback port, and the PromQL that dashboards ask of it."""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from .processes import ManagedProcess, Service, answers_ok, free_port

HOST = "127.0.0.1"
STARTUP_TIMEOUT = 30.0


class PromQLError(RuntimeError):
    """Prometheus refused a query (bad syntax, unknown function, wrong types...)."""


class PrometheusServer(Service):
    """``prometheus`` bound to 127.0.0.1 with a generated config and a temporary data directory.

    ``jobs`` maps a job name to its ``host:port`` targets; every job is scraped (and every
    rule file evaluated) each ``interval``. ``query()`` runs an instant query through the HTTP
    API and raises ``PromQLError`` when Prometheus rejects it. ``close()`` stops the server
    and deletes the directory it created.
    """

    def __init__(
        self,
        jobs: Mapping[str, Sequence[str]],
        *,
        rule_files: Sequence[Path] = (),
        interval: str = "1s",
        binary: str = "prometheus",
    ) -> None:
        self.port = free_port()
        self.workdir = Path(tempfile.mkdtemp(prefix="capgate-prometheus-"))
        self.config_path = self.workdir / "prometheus.yml"
        config = {
            "global": {"scrape_interval": interval, "evaluation_interval": interval},
            "rule_files": [str(path.resolve()) for path in rule_files],
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": list(targets)}]}
                for job, targets in jobs.items()
            ],
        }
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        command = [
            binary,
            f"--config.file={self.config_path}",
            f"--storage.tsdb.path={self.workdir / 'data'}",
            f"--web.listen-address={HOST}:{self.port}",
            "--storage.tsdb.retention.time=1h",
            "--log.level=warn",
        ]
        self._process = ManagedProcess(command, log_path=self.workdir / "prometheus.log")

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self) -> None:
        """Start the server and wait until ``/-/ready`` answers 200."""
        self._process.start()
        try:
            self._process.wait_until(self._ready, STARTUP_TIMEOUT, what="prometheus /-/ready")
        except BaseException:
            self.close()
            raise

    def query(self, expr: str) -> dict[str, Any]:
        """Evaluate ``expr`` now; return the API's ``data`` (``resultType`` and ``result``)."""
        reply = httpx.get(f"{self.base_url}/api/v1/query", params={"query": expr}, timeout=10)
        body = reply.json()
        if body.get("status") != "success":
            raise PromQLError(f"{expr!r}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def api(self, path: str) -> Any:
        """``GET /api/v1/<path>`` and return its ``data``."""
        reply = httpx.get(f"{self.base_url}/api/v1/{path}", timeout=10)
        reply.raise_for_status()
        return reply.json()["data"]

    def wait_until(self, predicate: Callable[[], bool], timeout: float, *, what: str) -> None:
        """Poll ``predicate`` until true; fail early with the log tail if Prometheus exits."""
        self._process.wait_until(predicate, timeout, interval=0.5, what=what)

    def log_tail(self) -> str:
        return self._process.log_tail()

    def shutdown(self) -> None:
        self.close()

    def close(self) -> None:
        """Stop the server and delete its directory."""
        self._process.stop(timeout=10.0)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def _ready(self) -> bool:
        return answers_ok(f"{self.base_url}/-/ready")


METRIC_NAME = re.compile(r"(?<![\w:])(capgate_\w+|vllm:[\w:]+)")
GRAFANA_BUILTINS = {
    "__rate_interval": "1m",
    "__interval": "15s",
    "__interval_ms": "15000",
    "__range": "5m",
    "__range_s": "300",
}
_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]")
_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(?P<metric>.+?)\s*,\s*(?P<label>\w+)\s*\)\s*$")


@dataclass(frozen=True)
class PanelQuery:
    """One PromQL expression of a dashboard panel (or of a template variable)."""

    dashboard: str
    panel: str
    expr: str


def metric_names(expr: str) -> set[str]:
    """The ``capgate_*`` and ``vllm:*`` metric names an expression mentions."""
    return set(METRIC_NAME.findall(expr))


def dashboard_panels(dashboard: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every panel of a dashboard, including those nested in collapsed rows, rows excluded."""
    panels: list[dict[str, Any]] = []
    for panel in dashboard.get("panels", []):
        if panel.get("type") == "row":
            panels.extend(panel.get("panels", []))
        else:
            panels.append(panel)
    return panels


def substitute(expr: str, dashboard: Mapping[str, Any]) -> str:
    """Replace Grafana variables the way Grafana would with every variable at "All".

    Built-ins get fixed values (``$__rate_interval`` is ``1m``); a dashboard variable gets its
    ``allValue`` (``.*``). Unknown variables are left in place, so a caller can detect them.
    """
    values = dict(GRAFANA_BUILTINS)
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") in {"query", "custom"}:
            values[variable["name"]] = variable.get("allValue") or ".*"

    def replace(match: re.Match[str]) -> str:
        name = next(group for group in match.groups() if group)
        return values.get(name, match[0])

    return _VARIABLE.sub(replace, expr)


def dashboard_queries(dashboard: Mapping[str, Any]) -> list[PanelQuery]:
    """The PromQL of every panel target and query variable, variables substituted.

    A variable's ``label_values(metric, label)`` becomes ``count by (label) (metric)``.
    """
    title = dashboard["title"]
    queries = [
        PanelQuery(title, panel["title"], substitute(target["expr"], dashboard))
        for panel in dashboard_panels(dashboard)
        for target in panel.get("targets", [])
        if target.get("expr")
    ]
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") != "query":
            continue
        match = _LABEL_VALUES.match(variable.get("definition", ""))
        if match is None:
            raise ValueError(f"{title}: variable {variable['name']} is not label_values(metric, label)")
        expr = f"count by ({match['label']}) ({match['metric']})"
        queries.append(PanelQuery(title, f"${variable['name']}", substitute(expr, dashboard)))
    return queries
