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


def _all_docs(*args: str) -> list[dict]:
    out = _render(*args)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def _docs(*args: str) -> dict[str, dict]:
    return {d["kind"]: d for d in _all_docs(*args)}


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
    (["--set", "redis.url=redis://r:6379/0", "--set", "redis.bundled.enabled=true"], "redis.bundled.enabled"),
    (["--set", "modelDownload.enabled=true"], "modelDownload.repos"),
    (["--set", "model=/m", "--set", "registry.default=x"], "registry"),
    (["--set", "autoscaling.enabled=true", "--set", "autoscaling.mode=gpu"], "autoscaling.mode"),
    (["--set", "settings.api_keys_file=/k"], "settings.api_keys_file"),
    (["--set", "apiKeys.existingSecret=s", "--set", "apiKeys.keys[0]=k"], "apiKeys"),
])
def test_bad_values_fail_naming_the_value(args, message):
    out = _render(*args)
    assert out.returncode != 0
    assert message in out.stderr, out.stderr


# --- the values files of helm/rewardserve/ci: lint, render, validate against Kubernetes' schemas ------------

CI_VALUES = sorted((CHART / "ci").glob("*.yaml"))
KUBERNETES_VERSION = "1.33.0"  # the schemas every rendered manifest must validate against
ROOT = CHART.parents[1]


def _kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def _exported_metrics() -> set[str]:
    """Every series name the server exports (histograms as _bucket/_sum/_count, counters as _total)."""
    from rewardserve.monitoring.metrics import Metrics

    names = set()
    for family in Metrics().registry.collect():
        names.add(family.name)
        names.update(s.name for s in family.samples)
        if family.type == "histogram":
            names.update(family.name + suffix for suffix in ("_bucket", "_sum", "_count"))
    return names


@pytest.mark.parametrize("values", CI_VALUES, ids=[p.stem for p in CI_VALUES])
def test_ci_values_lint_render_and_validate_against_the_kubernetes_schemas(values):
    try:
        import kubernetes_validate
    except ImportError:
        kubernetes_validate = None
    require_tool(kubernetes_validate is not None, "kubernetes-validate (`make test` installs it)")
    lint = subprocess.run([_helm(), "lint", "--strict", str(CHART), "-f", str(values)], capture_output=True,
                          text=True, timeout=60)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    docs = _all_docs("-f", str(values))
    for doc in docs:
        if doc["apiVersion"].startswith(("monitoring.coreos.com/", "keda.sh/")):
            continue  # CRDs: not in Kubernetes' own schemas (checked by the tests below)
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    [dep] = _kind(docs, "Deployment")
    [c] = dep["spec"]["template"]["spec"]["containers"]
    env = _env(dep)
    # the port the server listens on is the one the container, the probes and the Service name
    assert env["RS_PORT"]["value"] == str(c["ports"][0]["containerPort"]) and c["ports"][0]["name"] == "http"
    assert all(c[p]["httpGet"]["port"] == "http" for p in ("startupProbe", "readinessProbe", "livenessProbe"))
    values_ = {name[3:].lower(): e["value"] for name, e in env.items() if name.startswith("RS_") and "value" in e}
    assert set(values_) <= set(ServerSettings.model_fields) | set(QuickModel.model_fields)


def test_probes_and_scrapes_point_at_endpoints_the_server_serves(tiny_ckpt):
    from tests.server import serve

    docs = _all_docs("--set", "serviceMonitor.enabled=true")
    [dep] = _kind(docs, "Deployment")
    [c] = dep["spec"]["template"]["spec"]["containers"]
    probed = {c[p]["httpGet"]["path"] for p in ("startupProbe", "readinessProbe", "livenessProbe")}
    scraped = {dep["spec"]["template"]["metadata"]["annotations"]["prometheus.io/path"],
               _kind(docs, "ServiceMonitor")[0]["spec"]["endpoints"][0]["path"]}
    with serve(*quick(model=str(tiny_ckpt("llama")))) as server, server.client() as c:
        for path in probed | scraped:
            assert c.get(path).status_code == 200, path


def test_autoscaling_reads_metrics_the_server_exports_through_the_adapter_rules_shipped():
    exported = _exported_metrics()
    adapter = yaml.safe_load((ROOT / "deploy" / "prometheus-adapter" / "values.yaml").read_text())
    served = {}
    for rule in adapter["rules"]["custom"]:
        series = rule["seriesQuery"].split("{")[0]
        assert series in exported, series
        served[rule["name"]["as"]] = series
    docs = _all_docs("-f", str(CHART / "ci" / "prometheus-adapter.yaml"))
    [hpa] = _kind(docs, "HorizontalPodAutoscaler")
    pods = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert pods == ["rewardserve_queued_tokens", "rewardserve_queue_p90_seconds"]
    assert set(pods) <= set(served)  # every custom metric the HPA reads is one the adapter serves
    assert any(m["type"] == "Resource" and m["resource"]["name"] == "cpu" for m in hpa["spec"]["metrics"])
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 300
    # KEDA: its Prometheus queries name exported series and only this release's pods
    docs = _all_docs("-f", str(CHART / "ci" / "keda.yaml"))
    assert not _kind(docs, "HorizontalPodAutoscaler")  # KEDA makes its own
    [scaled] = _kind(docs, "ScaledObject")
    assert scaled["spec"]["scaleTargetRef"]["name"] == _kind(docs, "Deployment")[0]["metadata"]["name"]
    queries = [t["metadata"]["query"] for t in scaled["spec"]["triggers"] if t["type"] == "prometheus"]
    assert len(queries) == 2 and all('pod=~"rs-rewardserve-.*"' in q for q in queries)
    import re

    for q in queries:
        assert set(re.findall(r"(rewardserve_[a-z_]+)\{", q)) <= exported, q
    assert [t["type"] for t in scaled["spec"]["triggers"]][-1] == "cpu"


def test_prometheus_rule_carries_the_rules_of_deploy_prometheus():
    docs = _all_docs("--set", "prometheusRule.enabled=true")
    [rule] = _kind(docs, "PrometheusRule")
    assert rule["spec"] == yaml.safe_load((ROOT / "deploy" / "prometheus" / "rules.yml").read_text())


def test_bundled_redis_is_shared_by_the_replicas_and_selected_apart_from_them():
    docs = _all_docs("-f", str(CHART / "ci" / "bundled-redis.yaml"))
    [sts] = _kind(docs, "StatefulSet")
    [dep] = _kind(docs, "Deployment")
    services = {s["metadata"]["name"]: s for s in _kind(docs, "Service")}
    redis_svc = services[sts["spec"]["serviceName"]]
    assert _env(dep)["RS_REDIS_URL"]["value"] == f"redis://{redis_svc['metadata']['name']}:6379/0"
    assert redis_svc["spec"]["ports"][0]["port"] == 6379
    redis_pod = sts["spec"]["template"]["metadata"]["labels"]
    server_pod = dep["spec"]["template"]["metadata"]["labels"]
    selects = lambda selector, labels: all(labels.get(k) == v for k, v in selector.items())  # noqa: E731
    assert selects(redis_svc["spec"]["selector"], redis_pod) and not selects(redis_svc["spec"]["selector"], server_pod)
    server_svc = services[dep["metadata"]["name"]]
    assert selects(server_svc["spec"]["selector"], server_pod) and not selects(server_svc["spec"]["selector"], redis_pod)
    assert not selects(dep["spec"]["selector"]["matchLabels"], redis_pod)
    assert sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "2Gi"
    assert "--maxmemory-policy" in sts["spec"]["template"]["spec"]["containers"][0]["args"]


def test_registry_configmap_and_api_keys_secret_are_what_the_server_reads(tmp_path):
    from rewardserve.api.security import parse_keys
    from rewardserve.config import load_registry

    docs = _all_docs("-f", str(CHART / "ci" / "registry-download.yaml"), "-f", str(CHART / "ci" / "api-keys.yaml"))
    [dep] = _kind(docs, "Deployment")
    spec = dep["spec"]["template"]["spec"]
    [c] = spec["containers"]
    env = _env(dep)
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    # the registry: RS_CONFIG names the ConfigMap's file where it is mounted, and it loads
    [cm] = _kind(docs, "ConfigMap")
    assert env["RS_CONFIG"]["value"] == mounts["registry"] + "/registry.yaml"
    assert volumes["registry"]["configMap"]["name"] == cm["metadata"]["name"]
    (tmp_path / "registry.yaml").write_text(cm["data"]["registry.yaml"])
    registry = load_registry(tmp_path / "registry.yaml")
    assert [m.name for m in registry.models] == ["a", "b"] and registry.default == "ensemble"
    assert "checksum/registry" in dep["spec"]["template"]["metadata"]["annotations"]
    # the weights: downloaded by the init container into the volume the server reads them from
    [init] = spec["initContainers"]
    assert init["args"] == ["org/reward-a", "org/reward-b"] and init["command"][-1] == mounts["models"]
    assert {"name": "models", "mountPath": "/models"} in init["volumeMounts"]
    assert volumes["models"]["emptyDir"]["sizeLimit"] == "50Gi"
    assert {e["name"] for e in init["env"]} >= {"HF_TOKEN", "HF_HOME"}
    # the keys: RS_API_KEYS_FILE names the Secret's file where it is mounted, and it parses
    [secret] = _kind(docs, "Secret")
    assert env["RS_API_KEYS_FILE"]["value"] == mounts["api-keys"] + "/keys"
    assert volumes["api-keys"]["secret"]["secretName"] == secret["metadata"]["name"]
    keys = parse_keys(secret["stringData"]["keys"], None, None)
    assert len(keys) == 2


def test_drain_fits_in_the_grace_period_and_replicas_spread_across_nodes():
    docs = _all_docs("--set", "settings.drain_timeout_s=45", "--set", "lifecycle.preStopSeconds=15")
    [dep] = _kind(docs, "Deployment")
    spec = dep["spec"]["template"]["spec"]
    [c] = spec["containers"]
    assert c["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "15"]
    assert _env(dep)["RS_DRAIN_TIMEOUT_S"]["value"] == "45"
    assert spec["terminationGracePeriodSeconds"] == 15 + 45 + 10
    [spread] = spec["topologySpreadConstraints"]
    assert spread["topologyKey"] == "kubernetes.io/hostname"
    assert spread["labelSelector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]
    explicit = _all_docs("--set", "terminationGracePeriodSeconds=120")
    assert _kind(explicit, "Deployment")[0]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 120


def test_gpu_resources_node_selection_and_tolerations():
    docs = _all_docs("-f", str(CHART / "ci" / "multi-gpu.yaml"))
    [dep] = _kind(docs, "Deployment")
    spec = dep["spec"]["template"]["spec"]
    assert spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert spec["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert spec["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert "RS_DEVICES" not in _env(dep)  # every visible GPU


def test_notes_say_how_to_reach_the_service_and_check_readiness(tmp_path):
    """NOTES.txt rendered as `helm install` would (helm renders it only for an install, which needs a cluster:
    here the same template text goes through `helm template` inside a ConfigMap of a copy of the chart)."""
    chart = tmp_path / "rewardserve"
    shutil.copytree(CHART, chart)
    notes = (chart / "templates" / "NOTES.txt").read_text()
    (chart / "templates" / "_notes.tpl").write_text('{{- define "test.notes" -}}\n' + notes + "\n{{- end -}}\n")
    (chart / "templates" / "notes-test.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes\ndata:\n  notes: |\n"
        '    {{- include "test.notes" . | nindent 4 }}\n')
    out = subprocess.run([_helm(), "template", "rs", str(chart), "-f", str(CHART / "ci" / "ingress.yaml"),
                          "-f", str(CHART / "ci" / "api-keys.yaml"), "--show-only", "templates/notes-test.yaml"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    text = yaml.safe_load(out.stdout)["data"]["notes"]
    assert "https://rewards.example.com/" in text and "/readyz" in text and "rollout status deploy/rs-rewardserve" in text
    assert "authorization: Bearer" in text and "in-process only" in text


def test_hadolint_passes_on_the_dockerfile():
    hadolint = Path(sys.executable).parent / "hadolint"
    path = str(hadolint) if hadolint.exists() else shutil.which("hadolint")
    require_tool(path is not None, "hadolint")
    out = subprocess.run([path, str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
