"""glibc allocator tuning: applied once, and freed activation memory is reused (no fresh page faults)."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def _faults_per_alloc(tune: bool) -> int:
    """Minor page faults per cycle of allocating, touching and freeing activation-sized tensors (16, 64 and
    128 MiB, as a forward pass does) in a fresh interpreter, after a warm-up."""
    code = textwrap.dedent(f"""
        import resource, torch
        from rewardserve.runtime import keep_freed_memory
        if {tune}:
            assert keep_freed_memory() and keep_freed_memory()  # idempotent
        def cycle():
            for size in (4 << 20, 16 << 20, 32 << 20):  # float32 elements, each freed at once
                torch.ones(size)
        for _ in range(3):
            cycle()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(20):
            cycle()
        print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 20)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return int(out.stdout.strip())


def test_keep_freed_memory_stops_page_faulting_reused_activations():
    default, tuned = _faults_per_alloc(False), _faults_per_alloc(True)
    assert default > 20_000  # glibc's default: mmap per block, so every touch faults afresh
    assert tuned < default / 4
