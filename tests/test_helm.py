"""The Helm chart (helm/rewardserve): lint, render with default and production-like values, every
RS_* variable it sets is a valid setting, and bad values fail with a message naming them."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rewardserve.config import QuickModel, ServerSettings, quick
from tests.conftest import require_tool

CHART = Path(__file__).resolve().parents[1] / "helm" / "rewardserve"


def _helm() -> str:
    beside = Path(sys.executable).parent / "helm"  # `make test` installs helm-binary into the venv
    path = str(beside) if beside.exists() else shutil.which("helm")
    require_tool(path is not None, "helm")
    return path


def _render(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([_helm(), "template", "rs", str(CHART), *args], capture_output=True, text=True, timeout=60)


def _docs(*args: str) -> dict[str, dict]:
    out = _render(*args)
    assert out.returncode == 0, out.stderr
    return {d["kind"]: d for d in yaml.safe_load_all(out.stdout) if d}


def _env(deployment: dict) -> dict[str, dict]:
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e for e in container["env"]}


def test_chart_lints():
    out = subprocess.run([_helm(), "lint", "--strict", str(CHART)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_defaults_render_a_cpu_deployment_with_probes_on_health_endpoints():
    docs = _docs()
    assert set(docs) == {"Deployment", "Service"}
    dep = docs["Deployment"]
    spec = dep["spec"]["template"]["spec"]
    [c] = spec["containers"]
    assert c["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    assert c["startupProbe"]["httpGet"]["path"] == "/readyz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["securityContext"]["readOnlyRootFilesystem"] and spec["securityContext"]["runAsNonRoot"]
    assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]  # writable caches on a read-only root
    assert "nvidia.com/gpu" not in c["resources"].get("limits", {})
    env = _env(dep)
    assert env["RS_DEVICES"]["value"] == "cpu" and "RS_MODEL" not in env  # the embedded model
    pod_annotations = dep["spec"]["template"]["metadata"]["annotations"]
    assert pod_annotations["prometheus.io/path"] == "/metrics"
    svc = docs["Service"]
    assert svc["spec"]["ports"][0]["targetPort"] == "http"
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]


def test_every_rs_variable_is_a_valid_setting():
    """What the chart renders must start the server: each RS_* value passes the settings' validation
    (a YAML number printed as 1e+06, say, would not)."""
    dep = _docs("--set", "settings.max_queued_tokens=2000000", "--set", "settings.max_wait_ms=2.5",
                "--set", "settings.monitoring=false", "--set", "redis.url=redis://redis:6379/0")["Deployment"]
    values = {name[3:].lower(): e["value"] for name, e in _env(dep).items() if name.startswith("RS_") and "value" in e}
    assert set(values) <= set(ServerSettings.model_fields) | set(QuickModel.model_fields)
    settings, registry = quick(**values)
    assert registry.models[0].devices == "cpu"
    assert settings.max_queued_tokens == 2_000_000 and settings.max_wait_ms == 2.5 and settings.monitoring is False
    assert settings.redis_url == "redis://redis:6379/0" and settings.port == 8000 and settings.host == "0.0.0.0"


def test_production_values_gpu_redis_secret_volume_monitor_autoscaling():
    docs = _docs("--set", "gpu.enabled=true", "--set", "gpu.count=2", "--set", "redis.url=redis://redis:6379/0",
                 "--set", "redis.passwordSecret.name=redis-auth", "--set", "modelVolume.enabled=true",
                 "--set", "modelVolume.persistentVolumeClaim=models", "--set", "model=/models/my-rm",
                 "--set", "serviceMonitor.enabled=true", "--set", "autoscaling.enabled=true",
                 "--set", "podDisruptionBudget.enabled=true")
    assert {"Deployment", "Service", "ServiceMonitor", "HorizontalPodAutoscaler", "PodDisruptionBudget"} <= set(docs)
    dep = docs["Deployment"]
    [c] = dep["spec"]["template"]["spec"]["containers"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 2
    env = _env(dep)
    assert "RS_DEVICES" not in env  # auto: every visible GPU
    assert env["RS_MODEL"]["value"] == "/models/my-rm"
    assert env["RS_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "redis-auth", "key": "password"}
    assert "replicas" not in dep["spec"]  # the autoscaler owns the replica count
    assert {"name": "models", "mountPath": "/models", "readOnly": True} in c["volumeMounts"]
    assert docs["ServiceMonitor"]["spec"]["endpoints"][0]["path"] == "/metrics"


@pytest.mark.parametrize("args,message", [
    (["--set", "service.port=0"], "service.port"),
    (["--set", "replicaCount=-1"], "replicaCount"),
    (["--set", "redis.url=http://redis:6379"], "redis.url"),
    (["--set", "redis.passwordSecret.name=s"], "redis.url"),
    (["--set", "modelVolume.enabled=true"], "persistentVolumeClaim"),
    (["--set", "settings.port=9000"], "settings.port"),
    (["--set", "autoscaling.enabled=true", "--set", "autoscaling.minReplicas=5"], "minReplicas"),
    (["--set", "image.pullPolicy=Sometimes"], "pullPolicy"),
])
def test_bad_values_fail_naming_the_value(args, message):
    out = _render(*args)
    assert out.returncode != 0
    assert message in out.stderr, out.stderr
