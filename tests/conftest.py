"""Shared fixtures: tiny checkpoints built from configs, and real servers on loopback."""

from __future__ import annotations

import os

import pytest

from tests.factories import build_checkpoint

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_tool(found: bool, what: str) -> None:
    """Missing external tools fail in CI and skip only on a developer's machine."""
    if found:
        return
    if IN_CI:
        pytest.fail(f"{what} is required in CI but missing: run the README's test command (make test)")
    pytest.skip(f"{what} not installed (install it, or run `make test`)")


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """tiny_ckpt(arch, **opts) -> path of a tiny random checkpoint, built once per session per options."""
    cache: dict = {}

    def make(arch: str = "llama", **opts):
        key = (arch, tuple(sorted(opts.items())))
        if key not in cache:
            name = arch + "".join(f"-{k}={v}" for k, v in sorted(opts.items()))
            cache[key] = build_checkpoint(tmp_path_factory.mktemp(name.replace("=", "_")), arch, **opts)
        return cache[key]

    return make

# Nothing may be fetched from a model hub during tests: a hub id must fail fast, not wait on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
