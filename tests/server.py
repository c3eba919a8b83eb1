"""Run the real app under uvicorn on a free loopback port, in a background thread."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from typing import Iterator

import httpx
import uvicorn

from rewardserve.app import create_app
from rewardserve.config import RegistryConfig, ServerSettings


class RunningServer:
    def __init__(self, url: str, app):
        self.url = url
        self.app = app

    @property
    def registry(self):
        return self.app.state.registry

    @property
    def name(self) -> str:
        """The default entry's name."""
        return self.registry.default

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kw.pop("timeout", 60), **kw)

    def async_client(self, **kw) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, timeout=kw.pop("timeout", 60), **kw)

    def metric(self, name: str, **labels) -> float:
        """Current value of one sample from /metrics (0 when absent)."""
        return self.app.state.metrics.registry.get_sample_value(name, labels) or 0.0


@contextlib.contextmanager
def serve(settings: ServerSettings, registry: RegistryConfig, wait_ready: bool = True,
          ready_timeout: float = 120, wrap=None) -> Iterator[RunningServer]:
    """The app under uvicorn; `wrap(app)` puts an ASGI middleware of the test's in front of it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    app = create_app(settings, registry)
    server = uvicorn.Server(uvicorn.Config(wrap(app) if wrap else app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    running = RunningServer(url, app)
    try:
        deadline = time.monotonic() + ready_timeout
        path = "/readyz" if wait_ready else "/healthz"
        while True:
            try:
                if httpx.get(url + path, timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if app.state.registry.load_error is not None and wait_ready:
                raise RuntimeError(f"server failed to load: {app.state.registry.failure}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"server at {url} not ready after {ready_timeout}s")
            time.sleep(0.05)
        yield running
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
