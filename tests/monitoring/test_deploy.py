"""deploy/: the Grafana dashboard, the Prometheus rules and config, the compose example.

Every PromQL expression they hold may name only metrics a running rewardserve exports: a renamed metric
must break this test, not a dashboard panel in production.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from rewardserve.config import quick
from tests.server import serve

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "rewardserve.json"
RULES = DEPLOY / "prometheus" / "rules.yml"
PROM_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
COMPOSE = DEPLOY / "docker-compose.yml"

METRIC_RE = re.compile(r"\brewardserve_[a-zA-Z0-9_]+")

# panel title -> what it must show (metric names its queries use)
EXPECTED_PANELS = {
    "Request latency p50 / p95 / p99 by endpoint": ["rewardserve_request_duration_seconds_bucket"],
    "Throughput": ["rewardserve_requests_total", "rewardserve_tokens_total"],
    "Queue depth and queued tokens": ["rewardserve_queue_depth", "rewardserve_queued_tokens"],
    "Queue wait p99 by lane": ["rewardserve_queue_duration_seconds_bucket"],
    "Batch size: items and tokens": ["rewardserve_batch_items_sum", "rewardserve_batch_tokens_sum"],
    "Padding fraction": ["rewardserve_batch_padding_fraction_sum"],
    "Inference p99 per device": ["rewardserve_inference_duration_seconds_bucket"],
    "Device busy fraction": ["rewardserve_device_busy_seconds_total"],
    "Cache hit ratio per tier": ["rewardserve_cache_hits_total", "rewardserve_cache_misses_total"],
    "Cache errors by kind": ["rewardserve_cache_errors_total"],
    "Redis circuit breaker": ["rewardserve_cache_breaker_state"],
    "Prefix sharing and single-flight": ["rewardserve_prefix_saved_tokens_total"],
    "Reward distribution (per scrape interval)": ["rewardserve_reward_bucket"],
    "Reward window: mean, std, quantiles": ["rewardserve_reward_window_mean", "rewardserve_reward_window_std",
                                            "rewardserve_reward_window_quantile"],
    "PSI (current window vs reference)": ["rewardserve_drift_psi"],
    "KS statistic": ["rewardserve_drift_ks"],
    "Mean shift (reference std units)": ["rewardserve_drift_mean_shift"],
    "Length-reward correlation": ["rewardserve_hacking_length_correlation"],
    "Within-group reward std": ["rewardserve_hacking_group_std"],
    "Share of rewards at clip bounds": ["rewardserve_hacking_clip_share"],
    "Ensemble disagreement": ["rewardserve_hacking_disagreement"],
    "Errors by type": ["rewardserve_errors_total"],
    "429 rejections (admission control)": ["rewardserve_rejected_requests_total"],
    "Refused callers: missing or wrong keys, quotas": ["rewardserve_auth_rejections_total",
                                                       "rewardserve_quota_rejections_total"],
    "Requests in flight": ["rewardserve_requests_in_flight"],
    "Faults kept small": ["rewardserve_oom_splits_total", "rewardserve_worker_replacements_total"],
    "Verifier outcomes": ["rewardserve_verifier_results_total"],
    "Verifier time p99": ["rewardserve_verifier_seconds_bucket"],
    "Verifier processes replaced": ["rewardserve_verifier_process_replacements_total"],
}
SERVER_WIDE = {"rewardserve_auth_rejections_total", "rewardserve_quota_rejections_total",
               "rewardserve_requests_in_flight", "rewardserve_worker_replacements_total",
               "rewardserve_verifier_process_replacements_total"}
EXPECTED_ALERTS = {
    "RewardserveRewardDriftPSI": "rewardserve_drift_psi",
    "RewardserveRewardDriftKS": "rewardserve_drift_ks",
    "RewardserveEnsembleDisagreementRising": "rewardserve_hacking_disagreement",
    "RewardserveLatencyP99High": "rewardserve:request_duration_seconds:p99_5m",
    "RewardserveErrorRateHigh": "rewardserve:requests_5xx:ratio_rate5m",
    "RewardserveCacheBreakerOpen": "rewardserve_cache_breaker_state",
}


# -- helpers shared with test_prometheus_e2e.py ---------------------------------------------------------
def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def all_panels(dashboard: dict) -> list[dict]:
    out = []
    for p in dashboard["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))  # collapsed rows keep their panels inside
    return out


def dashboard_exprs(dashboard: dict) -> list[tuple[str, str]]:
    """(panel title, expr) of every query, plus the templating variables' queries."""
    exprs = [(p.get("title", ""), t["expr"]) for p in all_panels(dashboard) for t in p.get("targets", [])
             if t.get("expr")]
    for var in dashboard["templating"]["list"]:
        if var.get("type") == "query":
            q = var["query"]
            exprs.append((f"${var['name']}", q["query"] if isinstance(q, dict) else q))
    return exprs


def rule_exprs() -> list[tuple[str, str]]:
    rules = yaml.safe_load(RULES.read_text())
    return [(r.get("alert") or r.get("record"), r["expr"]) for g in rules["groups"] for r in g["rules"]]


def exported_names(metrics_text: str) -> set[str]:
    """Every sample name /metrics exposes, and the sample names of declared families with no samples yet
    (a labelled metric shows no sample before its first label set: cache errors without Redis, ...)."""
    names, declared = set(), {}
    for line in metrics_text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            declared[name] = kind
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    for name, kind in declared.items():
        if any(n == name or n.startswith(name + "_") for n in names):
            continue  # it has samples: those are the truth (a histogram with negative buckets has no _sum)
        if kind == "histogram":
            names |= {name + "_bucket", name + "_count", name + "_sum"}
        else:  # counter TYPE lines already carry _total in the text format
            names.add(name)
    return names


def score_traffic(client) -> None:
    """Requests that make every family the service can export on CPU without Redis show samples."""
    items = [{"prompt": f"What is {i} + {i}?", "response": f"{2 * i}" + " indeed" * (i % 4)} for i in range(24)]
    assert client.post("/v1/score", json={"items": items}).status_code == 200
    assert client.post("/v1/score", json={"items": items[:4]}).status_code == 200  # cache hits
    for k in range(3):
        r = client.post("/v1/best_of_n", json={"prompt": f"Say something nice, take {k}.",
                                                "candidates": ["You are great.", "Lovely day!", "Nice work, truly."]})
        assert r.status_code == 200
    assert client.post("/v1/score", json={"items": []}).status_code == 422  # an error, for errors_total


# -- the dashboard ---------------------------------------------------------------------------------------
def test_dashboard_is_valid_grafana_json_with_the_expected_panels():
    d = load_dashboard()
    assert 36 <= d["schemaVersion"] <= 41 and d["uid"] and d["title"]
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    model_q = variables["model"]["query"]
    assert (model_q["query"] if isinstance(model_q, dict) else model_q) == "label_values(rewardserve_ready, model)"
    panels = [p for p in all_panels(d) if p["type"] != "row"]
    ids = [p["id"] for p in all_panels(d)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    titles = {p["title"]: p for p in panels}
    for title, metrics in EXPECTED_PANELS.items():
        assert title in titles, f"missing panel {title!r}"
        exprs = " ".join(t["expr"] for t in titles[title]["targets"])
        for m in metrics:
            assert m in exprs, f"panel {title!r} does not query {m}"
    assert titles["Reward distribution (per scrape interval)"]["type"] == "heatmap"
    assert titles["Reward distribution (per scrape interval)"]["targets"][0]["format"] == "heatmap"
    for p in panels:
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}" and t["refId"]
            # every query follows the model picker (but for the server-wide metrics, which have no model
            # label: a request is refused or counted before it names one), and brackets balance
            if not set(METRIC_RE.findall(t["expr"])) <= SERVER_WIDE:
                assert 'model=~"$model"' in t["expr"], (p["title"], t["expr"])
            assert t["expr"].count("(") == t["expr"].count(")") and t["expr"].count("{") == t["expr"].count("}")
    # the percentiles of the latency panel, per endpoint
    latency = " ".join(t["expr"] for t in titles["Request latency p50 / p95 / p99 by endpoint"]["targets"])
    for q in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({q}, sum by (endpoint, le)" in latency


# -- rules, scrape config, compose -----------------------------------------------------------------------
def test_rules_are_valid_yaml_with_the_expected_alerts():
    rules = yaml.safe_load(RULES.read_text())
    (group,) = [g for g in rules["groups"] if g["name"] == "rewardserve"]
    alerts = {r["alert"]: r for r in group["rules"] if "alert" in r}
    records = {r["record"] for r in group["rules"] if "record" in r}
    assert records and all(r.startswith("rewardserve:") for r in records)
    for name, metric in EXPECTED_ALERTS.items():
        assert name in alerts, f"missing alert {name}"
        assert metric in alerts[name]["expr"], (name, alerts[name]["expr"])
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in ("info", "warning", "critical"), name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
        assert re.fullmatch(r"\d+[smh]", rule.get("for", "0s")), name
        for metric in re.findall(r"\brewardserve:[a-z0-9_:]+", rule["expr"]):
            assert metric in records, f"{name} uses unknown recording rule {metric}"
    for name, threshold, duration in (("RewardserveRewardDriftPSI", "> 0.25", "5m"),
                                      ("RewardserveRewardDriftKS", "> 0.3", "5m"),
                                      ("RewardserveEnsembleDisagreementRising", "[30m]", None),
                                      ("RewardserveLatencyP99High", "> 0.5", "5m"),
                                      ("RewardserveErrorRateHigh", "> 0.01", "5m"),
                                      ("RewardserveCacheBreakerOpen", "== 2", "1m")):
        assert threshold in alerts[name]["expr"], (name, alerts[name]["expr"])
        assert duration is None or alerts[name]["for"] == duration, name


def test_prometheus_config_scrapes_rewardserve_and_loads_the_rules():
    cfg = yaml.safe_load(PROM_CONFIG.read_text())
    assert cfg["rule_files"] == ["rules.yml"] and (PROM_CONFIG.parent / "rules.yml").exists()
    (job,) = [j for j in cfg["scrape_configs"] if j["job_name"] == "rewardserve"]
    assert job["static_configs"][0]["targets"] == ["rewardserve:8000"]
    assert job.get("metrics_path", "/metrics") == "/metrics"


def test_compose_example_wires_service_redis_prometheus_grafana():
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert set(services) >= {"rewardserve", "redis", "prometheus", "grafana"}
    rs = services["rewardserve"]
    assert (COMPOSE.parent / rs["build"]["context"] / rs["build"]["dockerfile"]).exists()
    assert rs["environment"]["RS_REDIS_URL"].startswith("redis://redis:6379")
    assert rs["environment"]["RS_HOST"] == "0.0.0.0"
    mounts = {v.split(":")[0]: v.split(":")[1] for v in services["prometheus"]["volumes"] if v.startswith(".")}
    assert mounts["./prometheus"] == "/etc/prometheus"
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]
    grafana_mounts = [v for v in services["grafana"]["volumes"] if v.startswith("./grafana:")]
    assert grafana_mounts and (COMPOSE.parent / "grafana" / "rewardserve.json").exists()
    dash_dir = grafana_mounts[0].split(":")[1]
    provisioning = yaml.safe_load(compose["configs"]["grafana-dashboards"]["content"])
    assert provisioning["providers"][0]["options"]["path"] == dash_dir
    ds = yaml.safe_load(compose["configs"]["grafana-datasource"]["content"])
    assert ds["datasources"][0]["url"] == "http://prometheus:9090"
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        proc = subprocess.run(["docker", "compose", "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr


def test_promtool_accepts_rules_and_config():
    from tests.conftest import require_tool

    require_tool(bool(shutil.which("promtool")), "promtool (Debian package prometheus)")
    for args in (["check", "rules", str(RULES)], ["check", "config", str(PROM_CONFIG)]):
        proc = subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stdout + proc.stderr


# -- every metric named in deploy/ is exported by a running service ----------------------------------------
@pytest.fixture(scope="module")
def metrics_text(tiny_ckpt) -> str:
    settings = quick(model=str(tiny_ckpt("llama")), drift_reference_size=10, drift_window=10,
                     monitor_interval_s=0.2, reward_clip_low=-1.0, reward_clip_high=1.0)
    with serve(*settings) as srv, srv.client() as c:
        score_traffic(c)
        assert c.get("/admin/drift").status_code == 200  # a fresh monitor refresh: gauges published
        deadline = time.monotonic() + 10
        while True:
            text = c.get("/metrics").text
            if "rewardserve_drift_psi{" in text and "rewardserve_hacking_group_std{" in text:
                return text
            assert time.monotonic() < deadline, "drift gauges never appeared"
            time.sleep(0.2)


def test_every_metric_in_deploy_is_exported_by_a_running_service(metrics_text):
    exported = exported_names(metrics_text)
    # sanity: the families that must carry samples after this traffic do
    for name in ("rewardserve_requests_total", "rewardserve_reward_bucket", "rewardserve_drift_psi",
                 "rewardserve_hacking_clip_share", "rewardserve_cache_hits_total", "rewardserve_errors_total",
                 "rewardserve_prefix_saved_tokens_total", "rewardserve_ready"):
        assert re.search(rf"^{name}[{{ ]", metrics_text, re.M), f"{name} has no sample"
    used = {}
    for where, expr in dashboard_exprs(load_dashboard()) + rule_exprs():
        for name in METRIC_RE.findall(expr):
            used.setdefault(name, where)
    assert len(used) >= 30
    unknown = {name: where for name, where in used.items() if name not in exported}
    assert not unknown, f"metrics not exported by the service (name -> first use): {unknown}"
    # and the dashboard shows every family the service declares, except bookkeeping ones
    families = {re.sub(r"_(total|bucket|sum|count)$", "", n) for n in used}
    declared = {line.split()[2] for line in metrics_text.splitlines() if line.startswith("# TYPE ")}
    declared = {re.sub(r"_total$", "", n) for n in declared if not n.endswith("_created")}
    assert not declared - families, f"exported but shown nowhere: {sorted(declared - families)}"
