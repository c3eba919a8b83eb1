"""Shared fixtures: tiny checkpoints built from configs, and real servers on loopback."""

from __future__ import annotations

import os

import pytest
import torch

# Triton kernels run for real on CUDA; without a GPU they run in Triton's interpreter. The variable is
# read when a kernel is decorated, so it must be set before anything imports `kernels`.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Nothing may be fetched from a model hub during tests: a hub id must fail fast, not wait on the network.
# (huggingface_hub reads these when it is first imported, so before tests.factories imports transformers.)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from tests.factories import build_checkpoint

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_tool(found: bool, what: str) -> None:
    """Missing external tools fail in CI and skip only on a developer's machine."""
    if found:
        return
    if IN_CI:
        pytest.fail(f"{what} is required in CI but missing: run the README's test command (make test)")
    pytest.skip(f"{what} not installed (install it, or run `make test`)")


KERNEL_TOOL = "a g++ that builds the CPU attention kernel (GNU g++ with OpenMP; `make test` installs it)"


def attention_kernel_builds() -> bool:
    """Whether kernels/attention_cpu.cpp compiles and loads here (built once, then cached)."""
    from rewardserve.kernels.attention_cpu import load_kernel

    return load_kernel() is not None


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """tiny_ckpt(arch, **opts) -> path of a tiny random checkpoint, built once per session per options."""
    cache: dict = {}

    def make(arch: str = "llama", **opts):
        key = (arch, repr(sorted(opts.items())))
        if key not in cache:
            name = arch + "".join(f"-{k}" for k in sorted(opts))
            cache[key] = build_checkpoint(tmp_path_factory.mktemp(name.replace("=", "_")), arch, **opts)
        return cache[key]

    return make