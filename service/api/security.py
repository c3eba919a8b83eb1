"""Who may call, and how much: API keys and per-key quotas.

Keys come from a file (`--api-keys-file`), one per line, that a Kubernetes Secret can mount:

    key                                   a key alone: its tenant is named `key-<line>`
    name:key                              a named tenant
    name:key:requests_per_s=5,tokens_per_s=20000   its own quotas (else the server's defaults)

Blank lines and lines starting with # are skipped. The file is read again when it changes (checked
every couple of seconds; a file that fails to parse keeps the previous keys, and the log says which
line). A request carries its key as `Authorization: Bearer KEY`, or `X-API-Key: KEY`, or, for peers
whose clients cannot set headers, `?api_key=KEY` (removed from the path before anything logs it).
Keys are compared in constant time, against every key; only tenant names reach logs and metrics.
No key: 401. A wrong key: 403. Public paths (health, readiness, metrics by default) need none.

Quotas are token buckets per tenant: requests per second, charged when the request arrives, and
tokens per second, charged once the request is tokenised. A bucket may go into debt by one request,
so a request bigger than a second's tokens is served, and its tenant then waits; a tenant in debt
gets 429 with the seconds until it is out of debt as Retry-After. Other tenants are not affected.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl, urlencode

from rewardserve.aio import cancel_and_wait
from rewardserve.api.errors import send_error
from rewardserve.errors import Forbidden, QuotaExceeded, ServiceError, Unauthorized
from rewardserve.monitoring.metrics import Metrics

log = logging.getLogger(__name__)
_RELOAD_EVERY_S = 2.0


@dataclass
class Bucket:
    """A token bucket holding up to one second of `rate`."""

    rate: float
    level: float = field(init=False)
    stamp: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.level = self.rate

    def take(self, amount: float) -> float:
        """Charge `amount`; 0 when allowed, else the seconds until the bucket is out of debt."""
        now = time.monotonic()
        self.level = min(self.rate, self.level + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.level < 0:
            return -self.level / self.rate
        self.level -= amount
        return 0.0


@dataclass
class Tenant:
    name: str
    key: bytes
    requests: Bucket | None
    tokens: Bucket | None
    metrics: Metrics | None = None

    @property
    def quotas(self) -> tuple[float | None, float | None]:
        return (self.requests and self.requests.rate, self.tokens and self.tokens.rate)

    def charge_request(self) -> None:
        self._charge(self.requests, 1, "requests")

    def charge_tokens(self, tokens: int) -> None:
        self._charge(self.tokens, tokens, "tokens")

    def _charge(self, bucket: Bucket | None, amount: float, kind: str) -> None:
        if bucket is None:
            return
        wait = bucket.take(amount)
        if wait > 0:
            if self.metrics is not None:
                self.metrics.quota_rejections.labels(self.name, kind).inc()
            raise QuotaExceeded(f"tenant {self.name!r} is over its quota of {bucket.rate:g} {kind}/s; retry in "
                                f"{wait:.2f} s", retry_after=max(1, math.ceil(wait)))


def _quotas(spec: str, n: int, rps: float | None, tps: float | None) -> tuple[float | None, float | None]:
    for setting in filter(None, spec.split(",")):
        what, _, value = setting.partition("=")
        try:
            number = float(value)
        except ValueError:
            number = -1.0
        if what not in ("requests_per_s", "tokens_per_s") or not 0 < number < math.inf:
            raise ValueError(f"line {n}: quotas are requests_per_s=R,tokens_per_s=T with positive numbers")
        rps, tps = (number, tps) if what == "requests_per_s" else (rps, number)
    return rps, tps


def parse_keys(text: str, requests_per_s: float | None, tokens_per_s: float | None) -> list[tuple]:
    """[(name, key, requests_per_s, tokens_per_s)]; ValueError names the line (never the key)."""
    out, names = [], set()
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(":")
        if len(parts) > 3:
            raise ValueError(f"line {n}: expected 'key', 'name:key' or 'name:key:quotas'")
        name, key = (f"key-{n}", parts[0]) if len(parts) == 1 else (parts[0], parts[1])
        rps, tps = requests_per_s, tokens_per_s
        if len(parts) == 3:
            rps, tps = _quotas(parts[2], n, rps, tps)
        if not name or len(key) < 8:
            raise ValueError(f"line {n}: a tenant needs a name and a key of at least 8 characters")
        if name in names:
            raise ValueError(f"line {n}: tenant {name!r} twice")
        names.add(name)
        out.append((name, key, rps, tps))
    if not out:
        raise ValueError("no keys in the file")
    return out


class KeyRing:
    """The tenants of the keys file, kept in step with it."""

    def __init__(self, path: str, requests_per_s: float | None, tokens_per_s: float | None, metrics: Metrics):
        self.path = Path(path)
        self.defaults = (requests_per_s, tokens_per_s)
        self.metrics = metrics
        self.tenants: list[Tenant] = []
        self._stamp: tuple | None = None
        self._task: asyncio.Task | None = None
        self.reload(initial=True)

    def _file_stamp(self) -> tuple:
        st = os.stat(self.path)  # follows the symlink a mounted Secret swaps on update
        return st.st_mtime_ns, st.st_ino, st.st_size

    def reload(self, initial: bool = False) -> bool:
        """Read the file if it changed; True when the keys were replaced."""
        try:
            stamp = self._file_stamp()
            if stamp == self._stamp:
                return False
            entries = parse_keys(self.path.read_text(), *self.defaults)
        except (OSError, ValueError) as exc:
            if initial:
                raise ValueError(f"api keys file {self.path}: {exc}") from None
            log.error("api keys file %s not reloaded, the previous keys stay: %s", self.path, exc)
            return False
        old = {t.name: t for t in self.tenants}
        tenants = []
        for name, key, rps, tps in entries:
            tenant = Tenant(name, key.encode(), Bucket(rps) if rps else None, Bucket(tps) if tps else None,
                            self.metrics)
            kept = old.get(name)
            if kept is not None and kept.quotas == tenant.quotas:  # unchanged quotas keep their buckets (and debt)
                tenant.requests, tenant.tokens = kept.requests, kept.tokens
            tenants.append(tenant)
        self.tenants, self._stamp = tenants, stamp
        if not initial:
            log.info("api keys reloaded from %s: %d tenants", self.path, len(tenants))
        return True

    def find(self, key: str) -> Tenant | None:
        """The key's tenant, comparing against every key in constant time."""
        given, found = key.encode(), None
        for t in self.tenants:
            if hmac.compare_digest(given, t.key):
                found = t
        return found

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._watch(), name="rewardserve-keys")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(_RELOAD_EVERY_S)
            self.reload()


class Auth:
    """ASGI middleware: the caller's key and request quota, before anything else runs."""

    def __init__(self, app, keys: KeyRing, public: set[str], metrics: Metrics):
        self.app, self.keys, self.public, self.metrics = app, keys, public, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in self.public:
            return await self.app(scope, receive, send)
        try:
            tenant = self._tenant(scope)
            tenant.charge_request()
        except ServiceError as exc:
            headers = [(b"www-authenticate", b"Bearer")] if isinstance(exc, Unauthorized) else []
            return await send_error(send, exc, headers)
        scope.setdefault("state", {})["tenant"] = tenant
        await self.app(scope, receive, send)

    def _tenant(self, scope) -> "Tenant":
        key = None
        for name, value in scope["headers"]:
            if name == b"authorization" and value[:7].lower() == b"bearer ":
                key = value[7:].decode("latin-1").strip()
            elif name == b"x-api-key":
                key = value.decode("latin-1").strip()
        query = parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
        if any(k == "api_key" for k, _ in query):
            key = key or next(v for k, v in query if k == "api_key")
            # off the path before uvicorn's access log or anything else sees it
            scope["query_string"] = urlencode([(k, v) for k, v in query if k != "api_key"]).encode("latin-1")
        if not key:
            self.metrics.auth_rejections.labels("missing").inc()
            raise Unauthorized("this server needs an API key: send 'Authorization: Bearer KEY'")
        tenant = self.keys.find(key)
        if tenant is None:
            self.metrics.auth_rejections.labels("wrong").inc()
            raise Forbidden("the API key is not valid here")
        return tenant
