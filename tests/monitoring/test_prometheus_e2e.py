"""A real Prometheus against a real rewardserve: the rules load and fire, the dashboard's queries answer.

Needs the Debian package `prometheus` (binaries `prometheus` and `promtool`; `make test` installs it).
Prometheus here is started with a throwaway config: it scrapes the test server on loopback every second
and evaluates deploy/prometheus/rules.yml (with every `for:` shortened to 0s). It reaches nothing else:
no alertmanager, no remote write, and Prometheus itself has no telemetry or update check.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from rewardserve.bench.proc import free_port
from rewardserve.config import quick
from tests.conftest import require_tool
from tests.monitoring.test_deploy import RULES, dashboard_exprs, load_dashboard, score_traffic
from tests.server import serve

pytestmark = pytest.mark.timeout(180)


def _require_prometheus() -> None:
    require_tool(bool(shutil.which("prometheus") and shutil.which("promtool")), "prometheus")


def _promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60)


# -- the rules, offline: promtool check + promtool unit tests -------------------------------------------
def _series(name: str, labels: dict, values: str) -> dict:
    body = ", ".join(f'{k}="{v}"' for k, v in labels.items())
    return {"series": f"{name}{{{body}}}", "values": values}


def _alert(alertname: str, eval_time: str, *firing: dict) -> dict:
    return {"alertname": alertname, "eval_time": eval_time, "exp_alerts": [{"exp_labels": f} for f in firing]}


def _buckets(endpoint: str, values_by_le: dict) -> list[dict]:
    return [_series("rewardserve_request_duration_seconds_bucket", {**M, "endpoint": endpoint, "le": le}, values)
            for le, values in values_by_le.items()]


M, H = {"model": "m"}, {"model": "m", "head": "h"}
UNIT_TESTS = [
    {"name": "psi above 0.25 for 5m fires; a moderate head stays quiet", "interval": "1m",
     "input_series": [_series("rewardserve_drift_psi", H, "0.1 0.1 0.4x10"),
                      _series("rewardserve_drift_psi", {"model": "m", "head": "g"}, "0.2x12")],
     "alert_rule_test": [_alert("RewardserveRewardDriftPSI", "5m"),
                         _alert("RewardserveRewardDriftPSI", "8m", {**H, "severity": "warning"})]},
    {"name": "ks above 0.3 for 5m fires", "interval": "1m",
     "input_series": [_series("rewardserve_drift_ks", H, "0.2 0.5x10")],
     "alert_rule_test": [_alert("RewardserveRewardDriftKS", "4m"),
                         _alert("RewardserveRewardDriftKS", "7m", {**H, "severity": "warning"})]},
    {"name": "disagreement rising 0.3 per 30m fires; a flat one does not", "interval": "1m",
     "input_series": [_series("rewardserve_hacking_disagreement", M, "0.1x30 0.1+0.01x60"),
                      _series("rewardserve_hacking_disagreement", {"model": "flat"}, "0.5x90")],
     "alert_rule_test": [_alert("RewardserveEnsembleDisagreementRising", "25m"),
                         _alert("RewardserveEnsembleDisagreementRising", "80m", {**M, "severity": "warning"})]},
    {"name": "p99 of a scoring endpoint above 0.5 s for 5m fires; /metrics and fast endpoints do not",
     "interval": "1m",
     "input_series": [
         # /v1/score: half the requests under 0.256 s, the rest under 1.024 s -> p99 ~ 1 s
         *_buckets("/v1/score", {"0.256": "0+50x20", "1.024": "0+100x20", "+Inf": "0+100x20"}),
         *_buckets("/v1/best_of_n", {"0.256": "0+100x20", "1.024": "0+100x20", "+Inf": "0+100x20"}),
         *_buckets("/metrics", {"0.256": "0x20", "+Inf": "0+10x20"}),
     ],
     "alert_rule_test": [_alert("RewardserveLatencyP99High", "3m"),
                         _alert("RewardserveLatencyP99High", "8m",
                                {**M, "endpoint": "/v1/score", "severity": "warning"})]},
    {"name": "5xx share above 1% for 5m fires; a healthy model does not", "interval": "1m",
     "input_series": [
         _series("rewardserve_requests_total", {**M, "endpoint": "/v1/score", "status": "200"}, "0+100x20"),
         _series("rewardserve_requests_total", {**M, "endpoint": "/v1/score", "status": "503"}, "0+5x20"),
         _series("rewardserve_requests_total", {"model": "ok", "endpoint": "/v1/score", "status": "200"}, "0+100x20"),
         _series("rewardserve_requests_total", {"model": "ok", "endpoint": "/v1/score", "status": "503"}, "0x20"),
     ],
     "alert_rule_test": [_alert("RewardserveErrorRateHigh", "4m"),
                         _alert("RewardserveErrorRateHigh", "8m", {**M, "severity": "critical"})]},
    {"name": "breaker open for 1m fires, and clears when it closes", "interval": "1m",
     "input_series": [_series("rewardserve_cache_breaker_state", M, "0 0 2x5 0x5"),
                      _series("rewardserve_cache_breaker_state", {"model": "half"}, "1x12")],
     "alert_rule_test": [_alert("RewardserveCacheBreakerOpen", "2m"),
                         _alert("RewardserveCacheBreakerOpen", "4m", {**M, "severity": "warning"}),
                         _alert("RewardserveCacheBreakerOpen", "10m")]},
    {"name": "sustained 429s and a down target", "interval": "1m",
     "input_series": [_series("rewardserve_rejected_requests_total", M, "0+3x20"),
                      _series("up", {"job": "rewardserve", "instance": "a:8000"}, "1 1 0x5")],
     "alert_rule_test": [_alert("RewardserveOverloaded", "5m"),
                         _alert("RewardserveOverloaded", "12m", {**M, "severity": "info"}),
                         _alert("RewardserveDown", "3m"),
                         _alert("RewardserveDown", "5m", {"job": "rewardserve", "instance": "a:8000",
                                                          "severity": "critical"})]},
]


def test_promtool_checks_the_rules_and_its_unit_tests_pass(tmp_path):
    _require_prometheus()
    proc = _promtool("check", "rules", str(RULES))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # promtool compares annotations verbatim; they are checked by `check rules` (templates parse), so the
    # unit tests run on a copy without them: same expressions, `for` and labels.
    rules = yaml.safe_load(RULES.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules))
    tested = {case["alertname"] for t in UNIT_TESTS for case in t["alert_rule_test"]}
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    assert tested == alerts, f"alerts without a unit test: {alerts - tested}"
    (tmp_path / "tests.yml").write_text(yaml.safe_dump({"rule_files": ["rules.yml"], "evaluation_interval": "1m",
                                                        "tests": UNIT_TESTS}))
    proc = _promtool("test", "rules", str(tmp_path / "tests.yml"))
    assert proc.returncode == 0, proc.stdout + proc.stderr


# -- a live Prometheus scraping a live server -----------------------------------------------------------
class Prom:
    def __init__(self, url: str, log: Path):
        self.url = url
        self.log = log

    def api(self, path: str, **params) -> dict:
        r = httpx.get(self.url + path, params=params, timeout=10)
        body = r.json()
        assert body["status"] == "success", (path, params, body)
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        data = self.api("/api/v1/query", query=expr)
        return data["result"]

    def logs(self) -> str:
        return self.log.read_text()[-3000:] if self.log.exists() else ""


def _start_prometheus(tmp_path: Path, target: str, rules: Path):
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
        "rule_files": [str(rules)],
        "scrape_configs": [{"job_name": "rewardserve", "static_configs": [{"targets": [target]}]}],
    }))
    log = tmp_path / "prometheus.log"
    proc = subprocess.Popen(
        ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn", "--storage.tsdb.retention.time=1h"],
        stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd=tmp_path,
    )
    return proc, Prom(f"http://127.0.0.1:{port}", log)


def _wait(what: str, check, timeout: float, prom: Prom, interval: float = 0.25):
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
        except (httpx.TransportError, AssertionError, KeyError):
            result = None
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; prometheus log:\n{prom.logs()}")
        time.sleep(interval)


def _panel_query(expr: str) -> str:
    """A dashboard expression as Grafana would send it, with the variables set to 'All'."""
    return (expr.replace("$__rate_interval", "30s").replace('"$model"', '".*"').replace('"$head"', '".*"'))


def test_prometheus_scrapes_the_service_evaluates_the_rules_and_answers_the_dashboard(tiny_ckpt, tmp_path):
    _require_prometheus()
    start = time.monotonic()
    # a reference far from anything the tiny model scores (PSI, KS alerts), and a Redis that is not there
    # (the breaker opens and stays open: the breaker alert)
    reference = tmp_path / "reference.json"
    reference.write_text(json.dumps([100.0 + 0.1 * i for i in range(20)]))
    settings = quick(model=str(tiny_ckpt("llama")), drift_window=10, drift_reference_file=str(reference),
                     monitor_interval_s=0.2, redis_url=f"redis://127.0.0.1:{free_port()}/0",
                     cache_breaker_failures=1, cache_breaker_cooldown_s=3600, reward_clip_low=-1.0,
                     reward_clip_high=1.0)
    rules = yaml.safe_load(RULES.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = "0s"  # fire at the first evaluation that holds
    fast_rules = tmp_path / "rules.yml"
    fast_rules.write_text(yaml.safe_dump(rules))
    alert_names = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}

    with serve(*settings) as server, server.client() as client:
        target = server.url.removeprefix("http://")
        proc, prom = _start_prometheus(tmp_path, target, fast_rules)
        try:
            _wait("prometheus ready", lambda: httpx.get(prom.url + "/-/ready", timeout=2).status_code == 200, 20, prom)
            score_traffic(client)
            _wait("the scrape target to be up",
                  lambda: [t for t in prom.api("/api/v1/targets")["activeTargets"] if t["health"] == "up"], 15, prom)

            # the rules are loaded and evaluate without errors
            def rules_loaded():
                groups = prom.api("/api/v1/rules")["groups"]
                loaded = {r["name"]: r for g in groups for r in g["rules"]}
                assert alert_names <= set(loaded)
                assert all(r["health"] == "ok" for r in loaded.values()), [
                    (n, r.get("lastError")) for n, r in loaded.items() if r["health"] != "ok"]
                return loaded
            loaded = _wait("every rule loaded and evaluated", rules_loaded, 15, prom)
            assert {loaded[a]["type"] for a in alert_names} == {"alerting"}

            # keep traffic flowing (rates need two scrapes) until the key series answer
            client.post("/v1/score", json={"items": [{"text": "again"}, {"text": "again"}]})
            key = {
                "rewardserve_requests_total": lambda r: r,
                "histogram_quantile(0.99, sum by (le) (rate(rewardserve_request_duration_seconds_bucket[30s])))":
                    lambda r: [x for x in r if x["value"][1] != "NaN"],
                "rewardserve_drift_psi": lambda r: [x for x in r if float(x["value"][1]) > 0.25],
                "rewardserve_drift_ks": lambda r: [x for x in r if float(x["value"][1]) > 0.3],
                'rewardserve_reward_bucket{le="+Inf"}': lambda r: [x for x in r if float(x["value"][1]) > 0],
                'rewardserve_cache_hits_total{tier="lru"}': lambda r: [x for x in r if float(x["value"][1]) > 0],
                "rewardserve_cache_breaker_state": lambda r: [x for x in r if x["value"][1] == "2"],
                "sum(rate(rewardserve_tokens_total[30s]))": lambda r: [x for x in r if float(x["value"][1]) > 0],
            }
            for expr, ok in key.items():
                _wait(f"a result for {expr}", lambda: ok(prom.query(expr)), 15, prom)

            # every dashboard query is valid PromQL; those over series the service has exported answer
            text = client.get("/metrics").text
            with_samples = {line.split("{")[0].split(" ")[0] for line in text.splitlines()
                            if line and not line.startswith("#")}
            empty = []
            for title, expr in dashboard_exprs(load_dashboard()):
                if expr.startswith("label_values("):
                    continue  # a Grafana templating function, not PromQL
                q = _panel_query(expr)
                result = prom.query(q)  # asserts status == success: a syntax error fails here
                names = set(re.findall(r"\brewardserve_[a-zA-Z0-9_]+", expr))
                filtered = re.search(r'status=~"5\.\."', expr)  # no 5xx in this run
                if names <= with_samples and not filtered and not result:
                    empty.append((title, q))
            assert not empty, f"dashboard queries without data although their series exist: {empty}"

            # the alerts this run provokes fire
            def firing():
                alerts = prom.api("/api/v1/alerts")["alerts"]
                names = {a["labels"]["alertname"] for a in alerts if a["state"] == "firing"}
                return names >= {"RewardserveRewardDriftPSI", "RewardserveRewardDriftKS",
                                 "RewardserveCacheBreakerOpen"} and alerts
            alerts = _wait("drift and breaker alerts firing", firing, 10, prom)
            quiet = {a["labels"]["alertname"] for a in alerts} & {"RewardserveDown", "RewardserveErrorRateHigh"}
            assert not quiet, alerts
            psi_alert = next(a for a in alerts if a["labels"]["alertname"] == "RewardserveRewardDriftPSI")
            assert psi_alert["labels"]["model"] == server.name and psi_alert["labels"]["severity"] == "warning"
            assert "drifted" in psi_alert["annotations"]["summary"]
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
    assert time.monotonic() - start < 60, "the end-to-end test should stay well under a minute"
