"""Processes a benchmark runs against: the server under test and, when asked, a redis-server."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from typing import Iterator, NamedTuple


_handed_out: set[int] = set()


def _ephemeral_low() -> int:
    try:
        return int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default; other systems differ, and then a clash is only less unlikely


def free_port() -> int:
    """A loopback port free now, below the kernel's ephemeral range: a port from bind(0) can be taken, before
    the server binds it, as the source port of any outgoing connection (Ray alone opens hundreds)."""
    low = _ephemeral_low()
    if low - 20000 >= 1000:  # above Ray's worker ports (10002-19999)
        for _ in range(200):
            port = random.randrange(20000, low)
            if port in _handed_out:
                continue
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
            _handed_out.add(port)
            return port
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
