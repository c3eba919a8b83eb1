"""The `rewardserve` command.

    rewardserve serve [--model PATH_OR_ID | --config registry.yaml] [--port 8000] [...]   serve over HTTP
    rewardserve ray [--config registry.yaml] [--replicas N | --max-replicas N] [...]       the same on Ray Serve
    rewardserve score [INPUT.jsonl|-] [-o OUTPUT.jsonl] [--entry NAME] [...]            score a JSONL file offline
    rewardserve calibrate pairs|length DATA.jsonl [--entry NAME] [--out FIT.json]         fit a transform's map

Every server setting, and every setting of the --model quick path, is a flag here and an RS_*
environment variable; flags win over the environment.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
import types
import typing
from typing import Any

import orjson
from pydantic import ValidationError

from rewardserve.config import QuickModel, RegistryConfig, ServerSettings, quick
from rewardserve.drift_cli import add_arguments as add_drift_arguments


def _is_bool(annotation: Any) -> bool:
    return annotation is bool or (typing.get_origin(annotation) in (typing.Union, types.UnionType)
                                  and bool in typing.get_args(annotation))


# server settings first, then the --model quick path's (a one-entry registry; --config replaces them)
SETTING_FIELDS = {**ServerSettings.model_fields, **QuickModel.model_fields}


def add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per setting; unspecified flags are absent, so RS_* and defaults apply."""
    for name, field in SETTING_FIELDS.items():
        flag = "--" + name.replace("_", "-")
        help_text = f"{field.description} [env RS_{name.upper()}, default {field.default!r}]"
        if _is_bool(field.annotation):
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=help_text)
        else:
            parser.add_argument(flag, dest=name, default=argparse.SUPPRESS, metavar=name.upper(), help=help_text)


def settings_from_args(args: argparse.Namespace, **overrides: Any) -> tuple[ServerSettings, RegistryConfig]:
    values = {k: v for k, v in vars(args).items() if k in SETTING_FIELDS}
    values.update(overrides)
    try:
        return quick(**values)
    except ValidationError as exc:
        lines = [f"  --{'.'.join(map(str, e['loc'])).replace('_', '-')}: {e['msg']}" for e in exc.errors()]
        raise SystemExit("invalid settings:\n" + "\n".join(lines)) from None
    except ValueError as exc:  # the registry file, or a per-model flag beside --config
        raise SystemExit(str(exc)) from None


def cmd_serve(args: argparse.Namespace) -> None:
    import uvicorn

    from rewardserve.app import create_app
    from rewardserve.drain import DrainingServer

    settings, registry = settings_from_args(args)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings, registry)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            timeout_graceful_shutdown=10)
    DrainingServer(config, app.state, settings.drain_timeout_s).run()


def cmd_ray(args: argparse.Namespace) -> None:
    try:
        import ray
        from ray import serve
    except ImportError:
        raise SystemExit("`rewardserve ray` needs Ray Serve: pip install 'rewardserve[ray]'") from None
    from rewardserve.ray_serve import application, serialised

    settings, registry = settings_from_args(args)
    ray.init(address=args.address, logging_level=settings.log_level.upper())
    # Ray Serve's HTTP proxy takes the server's own --host and --port
    serve.start(http_options={"host": settings.host, "port": settings.port})
    app = application(*serialised(settings, registry), replicas=args.replicas, min_replicas=args.min_replicas,
                      max_replicas=args.max_replicas, target_ongoing_requests=args.target_ongoing_requests,
                      num_cpus=args.num_cpus, num_gpus=args.num_gpus)
    serve.run(app, name=args.name, route_prefix="/", blocking=False)
    print(f"rewardserve is serving through Ray Serve at http://{settings.host}:{settings.port}/", flush=True)
    if args.detach:
        return
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.delete(args.name)


def cmd_score(args: argparse.Namespace) -> None:
    from rewardserve.offline import score_jsonl

    # offline: the whole file is ours, so admission control must not reject our own chunks
    settings, registry = settings_from_args(
        args, **({} if "max_queued_tokens" in vars(args) else {"max_queued_tokens": 10**12}))
    if args.entry is not None and args.entry not in registry.names:
        raise SystemExit(f"--entry {args.entry!r} is not in the registry; its entries are {registry.names}")
    logging.basicConfig(level="WARNING")
    src = sys.stdin.buffer if args.input == "-" else open(args.input, "rb")
    dst = sys.stdout.buffer if args.output == "-" else open(args.output, "wb")
    try:
        failed = asyncio.run(score_jsonl(settings, registry, src, dst, entry=args.entry, truncation=args.truncation,
                                         progress=not args.quiet))
    finally:
        if src is not sys.stdin.buffer:
            src.close()
        if dst is not sys.stdout.buffer:
            dst.close()
    if failed:
        print(f"{failed} line(s) could not be scored; see their 'error' field", file=sys.stderr)
        raise SystemExit(1)


def cmd_bench_cache(args: argparse.Namespace) -> None:
    from rewardserve.bench.cache import run

    tiers = [t.strip() for t in args.tiers.split(",") if t.strip()]
    result = run(args.model, tiers, args.duration, args.concurrency, args.items_per_request, args.redis_url)
    print(orjson.dumps(result).decode())


def cmd_bench_throughput(args: argparse.Namespace) -> None:
    import torch

    from rewardserve.bench.throughput import run

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    result = run(device, args.dtype, args.items, args.min_len, args.max_len, args.repeats, args.batch_tokens,
                 args.arrival_batch_items)
    print(orjson.dumps(result).decode())


def cmd_bench_bon(args: argparse.Namespace) -> None:
    import torch

    from rewardserve.bench.bon import run

    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(orjson.dumps(run(device, args.dtype, shapes, args.groups, args.repeats, args.batch_tokens,
                           args.backend)).decode())


def cmd_bench_attention(args: argparse.Namespace) -> None:
    from rewardserve.bench.attention import run

    print(orjson.dumps(run(args.items, args.min_len, args.max_len, args.repeats, args.batch_tokens,
                           args.dtype)).decode())


def cmd_bench_peers(args: argparse.Namespace) -> None:
    from rewardserve.bench.peers import run

    result = run([d.strip() for d in args.dtypes.split(",") if d.strip()], args.rounds, args.warmup_s, args.seconds,
                 args.min_len, args.max_len, args.vllm_version, args.vllm_venv, args.vllm_reserved_cpus, args.device,
                 args.server_args.split() if args.server_args else [], args.expect_tokens_per_s, args.batch_requests)
    print(orjson.dumps(result).decode())


def cmd_bench_overload(args: argparse.Namespace) -> None:
    from rewardserve.bench.overload import run

    result = run(args.model, args.capacity_s, args.ramp_s, args.peak, args.deadline_s, args.concurrency, args.texts,
                 args.server_args.split() if args.server_args else None, args.rounds)
    print(orjson.dumps(result).decode())


def cmd_calibrate(args: argparse.Namespace) -> None:
    from rewardserve.calibrate import calibrate, table

    settings, registry = settings_from_args(
        args, **({} if "max_queued_tokens" in vars(args) else {"max_queued_tokens": 10**12}))
    if args.entry is not None and args.entry not in registry.names:
        raise SystemExit(f"--entry {args.entry!r} is not in the registry; its entries are {registry.names}")
    logging.basicConfig(level="WARNING")
    with open(args.data, "rb") as src:
        try:
            report = asyncio.run(calibrate(args.what, settings, registry, src, entry=args.entry, out=args.out,
                                           plot=args.plot, method=args.method, degree=args.degree,
                                           holdout=args.holdout, progress=not args.quiet))
        except ValueError as exc:
            raise SystemExit(f"{args.data}: {exc}") from None
    print(table(report), file=sys.stderr)
    print(orjson.dumps(report).decode())


def cmd_drift(args: argparse.Namespace) -> None:
    from rewardserve.drift_cli import run

    raise SystemExit(run(args))


def _device_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rewardserve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve a reward model over HTTP")
    add_settings_flags(serve)
    serve.set_defaults(func=cmd_serve)

    ray = sub.add_parser("ray", help="serve as a Ray Serve application on a Ray cluster (every serve flag applies "
                                     "to each replica; --host/--port are Ray Serve's HTTP proxy)")
    add_settings_flags(ray)
    ray.add_argument("--address", default=None,
                     help="Ray cluster to join (auto, or ray://host:10001); default: RAY_ADDRESS, else a local cluster")
    ray.add_argument("--replicas", type=int, default=1, help="replicas, one device each (without --max-replicas)")
    ray.add_argument("--min-replicas", type=int, default=1, help="autoscaling floor (with --max-replicas)")
    ray.add_argument("--max-replicas", type=int, default=None,
                     help="autoscale between --min-replicas and this on ongoing requests per replica")
    ray.add_argument("--target-ongoing-requests", type=float, default=64.0,
                     help="ongoing requests per replica the autoscaler aims for")
    ray.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per replica (1: a replica per GPU)")
    ray.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per replica")
    ray.add_argument("--name", default="rewardserve", help="the Serve application's name")
    ray.add_argument("--detach", action="store_true", help="leave the application running on the cluster and exit")
    ray.set_defaults(func=cmd_ray)

    score = sub.add_parser("score", help="score a JSONL file (or stdin) offline; writes JSONL")
    score.add_argument("input", nargs="?", default="-", help="JSONL input, one item per line (- for stdin)")
    score.add_argument("-o", "--output", default="-", help="JSONL output (- for stdout)")
    score.add_argument("--truncation", choices=["left", "right", "error"], default=None,
                       help="over-long items (default: the server's default_truncation)")
    score.add_argument("--entry", default=None, help="the registry entry that scores (default: the default entry)")
    score.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_settings_flags(score)
    score.set_defaults(func=cmd_score)

    cal = sub.add_parser("calibrate", help="fit a calibration (pairs) or a length fit (length) from a JSONL file")
    cal.add_argument("what", choices=["pairs", "length"])
    cal.add_argument("data", help="JSONL: {prompt, chosen, rejected} pairs, or items (with a 0/1 label for pairs)")
    cal.add_argument("--entry", default=None, help="the registry entry to fit (default: the default entry)")
    cal.add_argument("--out", default=None, help="the fit's JSON (default: beside the model, else ./ENTRY.rewardserve-"
                                                 "KIND.json)")
    cal.add_argument("--plot", default=None, help="the reliability diagram's PNG (default: beside the JSON)")
    cal.add_argument("--method", choices=["isotonic", "affine"], default="isotonic", help="pairs: the map's shape")
    cal.add_argument("--degree", type=int, default=1, help="length: the polynomial's degree")
    cal.add_argument("--holdout", type=float, default=0.2, help="share of the file kept out of the fit, to measure")
    cal.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_settings_flags(cal)
    cal.set_defaults(func=cmd_calibrate)

    drift = sub.add_parser("drift", help="print a running server's drift report; plot reference vs current rewards")
    add_drift_arguments(drift)
    drift.set_defaults(func=cmd_drift)

    bench = sub.add_parser("bench", help="benchmarks; each prints a table and a final JSON line")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    cache = bench_sub.add_parser("cache", help="100%% cache hits through HTTP vs the same server's /healthz")
    cache.add_argument("--model", default=None, help="checkpoint (default: the embedded model)")
    cache.add_argument("--tiers", default="lru,redis",
                       help="comma-separated: lru, redis, lru-nomon (LRU with the reward monitor off), miss (no "
                            "cache, distinct items: uncached requests through HTTP)")
    cache.add_argument("--redis-url", default=None, help="use this Redis (default: start a throwaway redis-server)")
    cache.add_argument("--duration", type=float, default=10.0, help="seconds of load per measurement")
    cache.add_argument("--concurrency", type=int, default=32, help="concurrent keep-alive connections")
    cache.add_argument("--items-per-request", type=int, default=1, help="items in each /v1/score request")
    cache.set_defaults(func=cmd_bench_cache)

    tput = bench_sub.add_parser("throughput", help="HF padded (arrival order, length-sorted) vs the packed fast path")
    _device_flags(tput)
    tput.add_argument("--items", type=int, default=48, help="sequences in the workload")
    tput.add_argument("--min-len", type=int, default=32)
    tput.add_argument("--max-len", type=int, default=1024)
    tput.add_argument("--repeats", type=int, default=3, help="alternating runs of each path (median reported)")
    tput.add_argument("--batch-tokens", type=int, default=16384, help="token budget of (b) and (c) batches")
    tput.add_argument("--arrival-batch-items", type=int, default=16, help="items per padded batch of (a)")
    tput.set_defaults(func=cmd_bench_throughput)

    bon = bench_sub.add_parser("bon", help="best-of-N with the shared prompt computed once vs independent scoring")
    _device_flags(bon)
    bon.add_argument("--shapes", default="512x16x128,1024x8x64", help="PROMPTxNxRESPONSE, comma-separated")
    bon.add_argument("--groups", type=int, default=2, help="groups per shape per run")
    bon.add_argument("--repeats", type=int, default=3, help="alternating runs (median reported)")
    bon.add_argument("--batch-tokens", type=int, default=16384)
    bon.add_argument("--backend", choices=("packed", "hf"), default="packed",
                     help="packed: tree-shaped batch; hf: padded HF model with the prompt's KV cache")
    bon.set_defaults(func=cmd_bench_bon)

    over = bench_sub.add_parser("overload",
                                help="capacity, then an open loop ramping to PEAK x capacity with deadlines")
    over.add_argument("--model", default=None, help="checkpoint (default: the embedded model)")
    over.add_argument("--capacity-s", type=float, default=5.0, help="seconds of closed-loop load to measure capacity")
    over.add_argument("--ramp-s", type=float, default=10.0, help="seconds of the open-loop ramp")
    over.add_argument("--peak", type=float, default=5.0, help="the ramp ends at this many times the capacity")
    over.add_argument("--deadline-s", type=float, default=2.0, help="each request's X-Request-Timeout")
    over.add_argument("--concurrency", type=int, default=16, help="closed-loop clients for the capacity")
    over.add_argument("--texts", type=int, default=64, help="distinct one-item requests (uncached)")
    over.add_argument("--rounds", type=int, default=2, help="ramps in a row (memory is read after each)")
    over.add_argument("--server-args", default="", help="more `rewardserve serve` flags, space-separated")
    over.set_defaults(func=cmd_bench_overload)

    peers = bench_sub.add_parser("peers", help="rewardserve vs vLLM on one checkpoint, alternating rounds (installs "
                                 "vLLM into a venv of its own; not part of make test)")
    peers.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda when available")
    peers.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated, each run in full")
    peers.add_argument("--rounds", type=int, default=3, help="alternating rounds per dtype (median reported)")
    peers.add_argument("--warmup-s", type=float, default=15.0, help="seconds of load before measuring")
    peers.add_argument("--seconds", type=float, default=40.0, help="seconds measured of the single-text workload")
    peers.add_argument("--batch-requests", type=int, default=6,
                       help="requests of 64 texts timed in the batch workload (after one per client, unmeasured)")
    peers.add_argument("--min-len", type=int, default=64, help="shortest text, in tokens")
    peers.add_argument("--max-len", type=int, default=1024, help="longest text, in tokens")
    peers.add_argument("--vllm-version", default="0.32.0")
    peers.add_argument("--vllm-venv", default=None, help="virtualenv with vLLM (default: created under "
                                                        "~/.cache/rewardserve/peers)")
    peers.add_argument("--vllm-reserved-cpus", type=int, default=0,
                       help="VLLM_CPU_NUM_OF_RESERVED_CPU (0: every core computes; vLLM's own default keeps one "
                            "for its API server); -1: leave vLLM's default")
    peers.add_argument("--server-args", default="", help="more `rewardserve serve` flags, space-separated")
    peers.add_argument("--expect-tokens-per-s", type=float, default=None,
                       help="sizes the pool of distinct texts (default 2e4 on CPU, 1e6 on CUDA)")
    peers.set_defaults(func=cmd_bench_peers)

    attn = bench_sub.add_parser("attention", help="CPU: the C++ attention kernel vs torch SDPA, alone and in the model")
    attn.add_argument("--items", type=int, default=32, help="sequences in the workload (bench throughput's)")
    attn.add_argument("--min-len", type=int, default=32)
    attn.add_argument("--max-len", type=int, default=1024)
    attn.add_argument("--repeats", type=int, default=5, help="alternating runs (median reported)")
    attn.add_argument("--batch-tokens", type=int, default=16384, help="the first batch of this budget is timed")
    attn.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    attn.set_defaults(func=cmd_bench_attention)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
