"""deploy/grafana and deploy/prometheus: the dashboard's first row, the alert rules, and
that every metric they query is exported by the service the query names (its job),
checked against that service's real ``services/<name>/metrics.py`` REGISTRY."""

from __future__ import annotations

import ast
import importlib
import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from asympo.config import Settings
from asympo.transport.streams import stream_metrics
from tests.deploy.manifests import ROOT, SERVICES, overlay
from tests.deploy.promql import Selector, balanced, grouping_labels, selectors

DASHBOARD = ROOT / "deploy/grafana/dashboards/asympo.json"
ALERTS = ROOT / "deploy/prometheus/alerts.yml"
SCRAPE_CONFIGS = (
    ROOT / "deploy/prometheus/prometheus.yml",
    ROOT / "deploy/prometheus/prometheus-k8s.yml",
)
JOB = {f"asympo-{s}": s for s in SERVICES}  # Prometheus job label -> service
PROMETHEUS_OWN = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}
SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
}
ALWAYS_LABELS = {"job", "instance", "namespace", "pod"}


@dataclass(frozen=True)
class Exported:
    """One exposed sample name of a service: its metric type and label names."""

    type: str
    labels: frozenset[str]


def registers_stream_consumer(service: str) -> bool:
    """Does the service's code build a stream Consumer on its own metrics REGISTRY?

    Consumers register asympo_stream_lag_entries / asympo_dead_letters_total on the
    registry they are given (asympo.transport.streams.stream_metrics) when they are created.
    """
    for path in (ROOT / "services" / service).glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            func = ast.unparse(node.func)
            if func not in ("Consumer", "Consumer.from_settings", "streams.Consumer"):
                continue
            for kw in node.keywords:
                if kw.arg == "registry" and ast.unparse(kw.value) in (
                    "metrics.REGISTRY", "REGISTRY"):
                    return True
    return False


@cache
def exported(service: str) -> dict[str, Exported]:
    """Every sample name the service exposes on /metrics, from its real registry."""
    module = importlib.import_module(f"services.{service}.metrics")
    registry: CollectorRegistry = module.REGISTRY
    if registers_stream_consumer(service):
        stream_metrics(registry)  # what the service's Consumer does when it starts
    collectors = getattr(registry, "_collector_to_names", {})
    labels_of: dict[str, tuple[str, ...]] = {}
    for collector, names in collectors.items():
        for name in names:
            labels_of[name] = tuple(getattr(collector, "_labelnames", ()))
    out: dict[str, Exported] = {}
    for family in registry.collect():
        base = labels_of.get(family.name, ())
        for suffix in SUFFIXES.get(family.type, ("",)):
            extra = {"le"} if suffix == "_bucket" else set()
            if family.type == "summary" and suffix == "":
                extra = {"quantile"}
            out[family.name + suffix] = Exported(family.type, frozenset(base) | extra)
    return out


def dashboard() -> dict[str, Any]:
    """The Grafana dashboard JSON."""
    return dict(json.loads(DASHBOARD.read_text()))


def dashboard_queries() -> list[tuple[str, str, str]]:
    """(panel title, expr, legendFormat) of every dashboard target."""
    return [(p["title"], t["expr"], t.get("legendFormat", ""))
            for p in dashboard()["panels"] for t in p.get("targets", [])]


def alert_rules() -> list[dict[str, Any]]:
    """Every rule of deploy/prometheus/alerts.yml."""
    return [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]


def all_queries() -> list[tuple[str, str, str]]:
    """(where, expr, legend) of every dashboard target and alert rule."""
    return [(f"panel '{t}'", e, lf) for t, e, lf in dashboard_queries()] + [
        (f"alert {r['alert']}", r["expr"], "") for r in alert_rules()]


def jobs_of(sel: Selector, where: str) -> list[str]:
    """The services a selector's job matcher names (exact or regex over known jobs)."""
    matcher = sel.matcher("job")
    assert matcher, f"{where}: {sel.metric} needs a job matcher naming the exporting service"
    op, value = matcher
    if op == "=":
        assert value in JOB, f"{where}: unknown job {value}"
        return [JOB[value]]
    assert op == "=~", f"{where}: job matcher {op} not supported"
    hits = [svc for job, svc in JOB.items() if re.fullmatch(value, job)]
    assert hits, f"{where}: job regex {value} matches no service"
    return hits


@pytest.mark.parametrize("service", SERVICES)
def test_service_registry_exists(service: str) -> None:
    assert exported(service), f"services/{service}/metrics.py REGISTRY exports nothing"


@pytest.mark.parametrize(("where", "expr", "legend"), all_queries(),
                         ids=[where for where, _e, _l in all_queries()])
def test_queried_metrics_are_exported_by_the_named_service(
    where: str, expr: str, legend: str
) -> None:
    assert balanced(expr), f"{where}: unbalanced brackets in {expr}"
    found = selectors(expr)
    assert found, f"{where}: no metric in {expr}"
    labels_in_scope = set(ALWAYS_LABELS)
    for sel in found:
        if sel.metric in PROMETHEUS_OWN:
            for svc in jobs_of(sel, where):
                assert svc in SERVICES
            continue
        assert sel.metric.startswith("asympo_"), f"{where}: unexpected metric {sel.metric}"
        for svc in jobs_of(sel, where):
            names = exported(svc)
            assert sel.metric in names, (
                f"{where}: {sel.metric} is not exported by {svc} "
                f"(services/{svc}/metrics.py REGISTRY)")
            metric = names[sel.metric]
            for label, _op, _value in sel.matchers:
                assert label in metric.labels | ALWAYS_LABELS, (
                    f"{where}: {sel.metric} has no label {label} in {svc}")
            labels_in_scope |= metric.labels
    for label in grouping_labels(expr) | set(re.findall(r"\{\{\s*(\w+)\s*\}\}", legend)):
        assert label in labels_in_scope, f"{where}: label {label} exists on no queried metric"
    # rate()/increase() only over counters and histogram series; histogram_quantile on buckets.
    for fn, metric in re.findall(r"\b(rate|irate|increase)\(\s*([a-zA-Z_:][\w:]*)", expr):
        kinds = {exported(s)[metric].type for s in SERVICES if metric in exported(s)}
        assert kinds <= {"counter", "histogram"}, f"{where}: {fn}() over a {kinds} {metric}"
    for inner in re.findall(r"histogram_quantile\([^,]+,(.*)", expr, flags=re.S):
        assert "_bucket" in inner, f"{where}: histogram_quantile needs _bucket series"


def test_first_row_is_staleness_and_loss_balance() -> None:
    panels = dashboard()["panels"]
    rows = [p for p in panels if p["type"] == "row"]
    first_row_y = min(p["gridPos"]["y"] for p in rows)
    second_row_y = sorted(p["gridPos"]["y"] for p in rows)[1]
    first = [p for p in panels if p["type"] != "row"
             and first_row_y < p["gridPos"]["y"] < second_row_y]
    exprs = [" ".join(t["expr"] for t in p["targets"]) for p in first]
    assert any("histogram_quantile" in e and "asympo_staleness_versions_bucket" in e
               for e in exprs), "first row: staleness quantiles"
    assert any(all(m in e for m in ("asympo_loss_balance", "asympo_loss_positive",
                                    "asympo_loss_negative")) for e in exprs), (
        "first row: loss balance with its positive and negative parts")
    assert any(all(m in e for m in ("asympo_update_norm", "asympo_update_share_positive_ratio"))
               for e in exprs), "first row: the update split at the logits and its share"


def test_dashboard_covers_every_area() -> None:
    text = json.dumps(dashboard())
    for metric in ("asympo_reward_mean", "asympo_accuracy_ratio",
                   "asympo_generated_tokens_total", "asympo_learner_samples_total",
                   "asympo_weight_swap_seconds_bucket", "asympo_probe_mismatch_total",
                   "asympo_stream_lag_entries", "asympo_dead_letters_total",
                   "asympo_policy_entropy_nats", "asympo_policy_version",
                   "asympo_importance_ratio_mean", "asympo_clip_fraction_ratio"):
        assert metric in text, f"dashboard misses {metric}"
    panels = dashboard()["panels"]
    assert len({p["id"] for p in panels}) == len(panels), "panel ids must be unique"
    for p in panels:
        grid = p["gridPos"]
        assert grid["x"] + grid["w"] <= 24, p["title"]


def test_alert_rules() -> None:
    rules = alert_rules()
    names = {r["alert"] for r in rules}
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations", "keep_firing_for"}
        assert rule["labels"]["severity"] in {"info", "warning", "critical"}
        assert rule["annotations"]["summary"]
        if "for" in rule:
            assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
    assert {"AsympoStalenessAboveBound", "AsympoLossBalanceDrift", "AsympoProbeMismatch",
            "AsympoStreamLagGrowing", "AsympoServiceDown", "AsympoOneSidedUpdate"} <= names
    # The staleness bound is the learner's configured default, not a second copy of it.
    stale = next(r for r in rules if r["alert"] == "AsympoStalenessAboveBound")
    bound = re.search(r">\s*(\d+)\s*$", stale["expr"])
    assert bound and int(bound.group(1)) == Settings().learner.max_staleness
    down = next(r for r in rules if r["alert"] == "AsympoServiceDown")
    assert "up{" in down["expr"]


def test_scrape_jobs_match_the_jobs_queried() -> None:
    compose_cfg = yaml.safe_load(SCRAPE_CONFIGS[0].read_text())
    scrape_jobs = {j["job_name"] for j in compose_cfg["scrape_configs"]}
    assert set(JOB) <= scrape_jobs
    for cfg_path in SCRAPE_CONFIGS:
        cfg = yaml.safe_load(cfg_path.read_text())
        assert cfg["rule_files"] == ["/etc/prometheus/alerts.yml"], cfg_path
    k8s = yaml.safe_load(SCRAPE_CONFIGS[1].read_text())["scrape_configs"][0]
    job_relabel = [r for r in k8s["relabel_configs"] if r.get("target_label") == "job"]
    assert job_relabel[0]["source_labels"] == ["__meta_kubernetes_pod_label_app_kubernetes_io_name"]
    # In the cluster the job is the pod's app.kubernetes.io/name: the same job names.
    names = {d["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"]
             for d in overlay("gpu") if d["kind"] in ("Deployment", "StatefulSet")}
    assert set(JOB) <= names


def test_grafana_provisioning_files_are_valid() -> None:
    for path in Path(ROOT / "deploy/grafana/provisioning").rglob("*.yml"):
        data = yaml.safe_load(path.read_text())
        assert data["apiVersion"] == 1, path
    dash = dashboard()
    assert dash["uid"] and dash["title"] == "ASymPO"


needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None,
                                    reason="promtool is not installed (Debian: prometheus)")


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    """Run promtool; its output is in the assertion message on failure."""
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=120)


@needs_promtool
def test_alert_rules_unit_tests_with_promtool() -> None:
    """Each alert fires on the situation it names and stays quiet otherwise."""
    result = promtool("test", "rules", str(ROOT / "deploy/prometheus/alerts_test.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    tested = set(re.findall(r"alertname: (\w+)",
                            (ROOT / "deploy/prometheus/alerts_test.yml").read_text()))
    untested = {r["alert"] for r in alert_rules()} - tested
    assert not untested, f"alerts without a promtool unit test: {untested}"


@needs_promtool
def test_prometheus_config_and_dashboard_queries_parse(tmp_path: Path) -> None:
    """promtool parses the compose scrape config and every dashboard expression."""
    config = (ROOT / "deploy/prometheus/prometheus.yml").read_text()
    (tmp_path / "prometheus.yml").write_text(
        config.replace("/etc/prometheus/alerts.yml", str(ALERTS)))
    result = promtool("check", "config", str(tmp_path / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    # Grafana's range variables become durations; each query becomes a recording rule.
    rules = [{"record": f"dashboard:query_{i}",
              "expr": expr.replace("$__rate_interval", "1m").replace("$__range", "1h")}
             for i, (_title, expr, _legend) in enumerate(dashboard_queries())]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
