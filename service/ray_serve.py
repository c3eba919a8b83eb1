"""rewardserve as a Ray Serve application: `rewardserve ray`, or `serve deploy deploy/ray/serve.yaml`.

Each replica is the whole server as `rewardserve serve` runs it (the same FastAPI app, registry,
engines, cache and metrics) on its own device: a GPU per replica where the cluster has them (Ray sets
CUDA_VISIBLE_DEVICES per replica, and the replica's `devices: auto` takes the one it sees), else CPUs.
Ray Serve's HTTP proxy routes requests across the replicas and scales their number on ongoing requests;
every replica points at the same Redis, so a score one computed is a hit on the others. Clients and the
peer adapters call the proxy's address exactly as they would call one server.

Ray is an optional extra (`pip install 'rewardserve[ray]'`): nothing else imports this module.
"""

from __future__ import annotations

from typing import Any

DEPLOYMENT = "rewardserve"


def _builder(settings: dict, registry: dict):
    """The replica's app, built where it runs (models load there, in the app's lifespan): Ray Serve calls a
    plain function it is given in place of an app once per replica."""

    def build():
        from rewardserve.app import create_app
        from rewardserve.config import RegistryConfig, ServerSettings

        return create_app(ServerSettings(**settings), RegistryConfig.model_validate(registry))

    return build


def application(settings: dict, registry: dict, *, replicas: int | None = 1, min_replicas: int = 1,
                max_replicas: int | None = None, target_ongoing_requests: float = 64.0,
                max_ongoing_requests: int = 1024, num_cpus: float = 1.0, num_gpus: float = 0.0):
    """A Ray Serve Application of the server (`settings`: ServerSettings fields; `registry`: RegistryConfig).
    With `max_replicas`, Serve autoscales between min_replicas and max_replicas on ongoing requests per
    replica (`target_ongoing_requests`); else it runs `replicas`. A replica takes `num_gpus` GPUs (one device
    each) and `num_cpus` CPUs. `max_ongoing_requests` is high because one replica batches many requests at
    once: its own admission control answers 429 when its queue is full."""
    from ray import serve

    options: dict[str, Any] = dict(
        name=DEPLOYMENT, max_ongoing_requests=max_ongoing_requests,
        ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus},
        graceful_shutdown_timeout_s=float(settings.get("drain_timeout_s", 30)) + 5,
    )
    if max_replicas:
        options["autoscaling_config"] = {"min_replicas": min_replicas, "max_replicas": max_replicas,
                                         "target_ongoing_requests": target_ongoing_requests}
    else:
        options["num_replicas"] = replicas
    deployment = serve.deployment(serve.ingress(_builder(settings, registry))(), **options)
    return deployment.bind()


def app_builder(args: dict):
    """The import path for a Serve config file (`import_path: rewardserve.ray_serve:app_builder`): `args` holds
    `settings` (server settings, as `rewardserve serve` flags' names with underscores, `config` included), and
    optionally replicas, min_replicas, max_replicas, target_ongoing_requests, max_ongoing_requests, num_cpus,
    num_gpus."""
    from rewardserve.config import quick

    args = dict(args)
    server, registry = quick(**args.pop("settings", {}))
    return application(*serialised(server, registry), **args)


def serialised(settings, registry) -> tuple[dict, dict]:
    """Settings and registry as plain data, for the replicas (set on the driver: flags and RS_* there)."""
    return (settings.model_dump(mode="json"), registry.model_dump(mode="json", exclude_none=True))
