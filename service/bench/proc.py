"""Processes a benchmark runs against: the server under test and, when asked, a redis-server."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from typing import Iterator, NamedTuple


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served(NamedTuple):
    port: int
    proc: subprocess.Popen

    def rss_bytes(self, peak: bool = False) -> int:
        """The server's resident memory now (or its peak), from /proc (Linux)."""
        field = "VmHWM:" if peak else "VmRSS:"
        for line in open(f"/proc/{self.proc.pid}/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"no {field} in /proc/{self.proc.pid}/status")


@contextlib.contextmanager
def server_process(args: list[str], timeout: float = 300, **popen) -> Iterator[Served]:
    """`rewardserve serve ARGS` on a free loopback port, in its own process; yields it once ready."""
    port = free_port()
    cmd = [sys.executable, "-m", "rewardserve.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--log-level", "warning", *args]
    proc = subprocess.Popen(cmd, env=dict(os.environ, PYTHONUNBUFFERED="1"), **popen)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}: {' '.join(cmd)}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("server not ready in time")
            time.sleep(0.1)
        yield Served(port, proc)
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


@contextlib.contextmanager
def redis_process() -> Iterator[str]:
    """A throwaway redis-server on loopback (no persistence); yields its URL."""
    if shutil.which("redis-server") is None:
        raise RuntimeError("redis-server is not installed (apt-get install redis-server), or pass --redis-url")
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL)
    try:
        for _ in range(200):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.1):
                break
            time.sleep(0.02)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(10)
