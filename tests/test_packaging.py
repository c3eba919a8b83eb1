"""The distribution installs one import package, `rewardserve`, and needs Triton only on CUDA."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _build_wheel(tmp_path: Path) -> Path:
    """Build from a copy of exactly what the Dockerfile copies, so the image's build is checked too."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("service", "kernels"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, capture_output=True, timeout=300)
    [wheel] = (tmp_path / "dist").glob("rewardserve-*.whl")
    return wheel


def test_wheel_holds_one_top_level_package_with_every_subpackage_and_data(tmp_path):
    wheel = _build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"rewardserve"}
    # every package of the source tree is in the wheel, under its mapped name, but the client: it is a
    # distribution of its own (service/client/pyproject.toml; tests/client checks it)
    for folder, package in (("service", "rewardserve"), ("kernels", "rewardserve/kernels")):
        for init in (ROOT / folder).rglob("__init__.py"):
            path = f"{package}/{init.relative_to(ROOT / folder).as_posix()}"
            assert (path in names) is not path.startswith("rewardserve/client/"), path
    assert "rewardserve/kernels/attention_cpu.cpp" in names
    assert "rewardserve/assets/default-rm/model.safetensors" in names
    assert "rewardserve/assets/default-judge/model.safetensors" in names and "rewardserve/verifiers/pool.py" in names
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "rewardserve = rewardserve.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()

    # installed on its own, it imports from where it was installed, and adds no other package
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    new = {p.name for p in target.iterdir() if p.name not in ("bin",) and not p.name.endswith(".dist-info")}
    assert new == {"rewardserve"}
    code = ("import rewardserve, rewardserve.kernels.attention_cpu, rewardserve.kernels.rmsnorm, rewardserve.app;"
            "print(rewardserve.__file__); print(rewardserve.kernels.attention_cpu.SOURCE)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, PYTHONPATH=str(target))).stdout.split()
    assert out[0] == str(target / "rewardserve" / "__init__.py")
    assert Path(out[1]).is_file() and Path(out[1]).parent == target / "rewardserve" / "kernels"


NO_TRITON = r"""
import asyncio, sys
sys.modules["triton"] = None  # `import triton` fails, as where it is not installed
from rewardserve.api.schemas import Item
from rewardserve.config import quick
from rewardserve.engine.registry import Registry
from rewardserve.kernels import rmsnorm
from rewardserve.monitoring.metrics import Metrics
from rewardserve.scorers.base import Call

async def rewards(backend):
    settings, registry = quick(backend=backend, lru_items=0, monitoring=False)
    reg = Registry(settings, registry, Metrics())
    await reg.start()
    try:
        items = [Item(prompt="What is 37 + 45?", response=r) for r in ("82", "83")]
        return [r.reward for r in await reg.get(None).score(items, Call())]
    finally:
        await reg.stop()

hf, packed = asyncio.run(rewards("hf")), asyncio.run(rewards("packed"))
assert max(abs(a - b) for a, b in zip(hf, packed)) <= 1e-4, (hf, packed)
try:
    rmsnorm._rmsnorm_kernel[(1,)]()
except RuntimeError as exc:
    print(exc)
print("ok", sys.modules["triton"], hf, packed)
"""


def test_the_hf_and_cpu_paths_need_no_triton():
    done = subprocess.run([sys.executable, "-c", NO_TRITON], capture_output=True, text=True, timeout=600,
                          env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert lines[0] == ("Triton is not installed: the kernel _rmsnorm_kernel runs on the CUDA path only "
                        "(pip install triton)")
    assert lines[1].startswith("ok None")
