"""A real redis-server on a free loopback port, which tests may kill and restart; and a slow proxy."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import threading
import time

import redis

from rewardserve.bench.proc import free_port
from tests.conftest import require_tool


class RedisProcess:
    def __init__(self, password: str | None = None):
        require_tool(shutil.which("redis-server") is not None, "redis-server")
        self.port = free_port()
        self.password = password
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password)

    def start(self) -> "RedisProcess":
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                if self.client().ping():
                    return self
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


class SlowProxy:
    """Forwards TCP to a target, holding every chunk back `delay` seconds (a slow network or Redis).
    `drops` is how many of the next client chunks (requests) are swallowed, their connection cut."""

    def __init__(self, target_port: int, delay: float = 0.0):
        self.target_port = target_port
        self.delay = delay
        self.drops = 0
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "SlowProxy":
        self._thread.start()
        self._ready.wait(5)
        return self

    def __exit__(self, *exc) -> None:
        async def shutdown():
            self._server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def pipe(reader, writer, upstream: bool):
            try:
                while data := await reader.read(65536):
                    if upstream and self.drops > 0:  # a request that never arrives: the connection drops
                        self.drops -= 1
                        client_writer_of[writer].transport.abort()
                        return
                    await asyncio.sleep(self.delay)
                    writer.write(data)
                    await writer.drain()
            except ConnectionError:
                pass
            finally:
                writer.close()

        client_writer_of = {}

        async def handle(client_reader, client_writer):
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
            client_writer_of[up_writer] = client_writer
            asyncio.ensure_future(pipe(client_reader, up_writer, True))
            asyncio.ensure_future(pipe(up_reader, client_writer, False))

        async def main():
            self._server = await asyncio.start_server(handle, "127.0.0.1", self.port)
            self._ready.set()

        self._loop.run_until_complete(main())
        self._loop.run_forever()
