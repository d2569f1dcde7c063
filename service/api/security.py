"""API keys, rate limit and body-size limit: one pure ASGI middleware in front of the routes.

Order, before any route code runs or any body byte is read:

1. **Auth.** Mutating requests (POST, PUT, PATCH, DELETE) always need ``Authorization: Bearer <key>``;
   reads (GET, HEAD, OPTIONS) only with ``api_auth_reads``. ``/healthz`` and the docs
   (``/openapi.json``, ``/docs``, ``/redoc``) are always open. No or a malformed header: 401 with
   ``WWW-Authenticate: Bearer``; a key the server does not know (or revoked): 403. A key sent with an
   open read is checked too (a wrong key is a 403, so a client learns early that its key is bad).
2. **Rate limit.** A token bucket per key id (anonymous reads: per client address):
   ``api_rate_limit_per_s`` tokens per second, ``api_rate_limit_burst`` at most. Empty: 429 with
   ``Retry-After`` (whole seconds until a token is back). The buckets live in the study store
   (:class:`SharedBucket`, one upsert per request), so API replicas sharing a database share the
   limit; while the database cannot be reached, or with ``api_rate_limit_shared=false``, each process
   keeps its own (:class:`TokenBucket`).
3. **Body size.** ``Content-Length`` above ``api_max_body_bytes``: 413 at once; a body without one
   (chunked) is read up to the limit, then 413.

Every answer uses the one error body of :mod:`service.api.errors`. Keys: :mod:`service.core.auth`.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import anyio
from starlette.responses import JSONResponse

from service.api.errors import error_body
from service.core.auth import KeyEntry, KeyRing, parse_entries
from service.core.settings import Settings

log = logging.getLogger("service.api")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
OPEN_PATHS = frozenset({"/healthz", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})
BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
SCHEME_NAME = "bearerAuth"
WWW_AUTHENTICATE = 'Bearer realm="bonn-sweep"'


def requires_key(method: str, path: str, settings: Settings) -> bool:
    """Whether a request needs a valid key (the rule the middleware enforces and the schema shows)."""
    if path in OPEN_PATHS:
        return False
    return method.upper() not in SAFE_METHODS or settings.api_auth_reads or settings.api_reads_own_studies


class TokenBucket:
    """Per-name token buckets: ``rate`` tokens/s, at most ``burst``. Thread-safe, in-process."""

    def __init__(self, rate: float, burst: int, max_names: int = 10_000) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.max_names = max_names
        self._buckets: dict[str, tuple[float, float]] = {}  # name -> (tokens, last time)
        self._lock = threading.Lock()

    def take(self, name: str, now: float | None = None) -> float:
        """0.0 if a token was taken, else the seconds until one is available."""
        if self.rate <= 0:
            return 0.0
        now = time.monotonic() if now is None else now
        with self._lock:
            tokens, last = self._buckets.get(name, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            if tokens >= 1.0:
                self._buckets[name] = (tokens - 1.0, now)
                wait = 0.0
            else:
                self._buckets[name] = (tokens, now)
                wait = (1.0 - tokens) / self.rate
            if len(self._buckets) > self.max_names:  # forget full buckets (idle names)
                for k in [k for k, (t, ts) in self._buckets.items() if t + (now - ts) * self.rate >= self.burst]:
                    self._buckets.pop(k, None)
            return wait

    def give_back(self, name: str) -> None:
        """Return the token a :meth:`take` took (the request was refused elsewhere after all)."""
        with self._lock:
            if name in self._buckets:
                tokens, last = self._buckets[name]
                self._buckets[name] = (min(self.burst, tokens + 1.0), last)


class SharedBucket:
    """The token buckets in the study store (``rate_buckets``, :meth:`StudyStore.take_token`), shared by
    every API process on that database. Blocking: call it from a worker thread. The process's own
    :class:`TokenBucket` is asked first: it sees a subset of the requests the shared one sees, so when it
    refuses the shared one would too, and the refusal costs no database write. When the store cannot
    be reached the local bucket's answer stands (the limit then holds per process) and a warning says
    so, at most once a minute."""

    def __init__(self, rate: float, burst: int, store_getter: Callable[[], Any]) -> None:
        self.rate = rate
        self.burst = burst
        self.store_getter = store_getter
        self.local = TokenBucket(rate, burst)
        self._warned = -math.inf

    def take(self, name: str) -> float:
        wait = self.local.take(name)
        store = self.store_getter()
        if wait > 0 or self.rate <= 0 or store is None:
            return wait
        try:
            shared_wait = store.take_token(name, self.rate, self.burst, time.time())
            if shared_wait > 0:  # refused by the shared count: the local token was not spent
                self.local.give_back(name)
            return shared_wait
        except Exception as exc:  # noqa: BLE001 - the database restarting: keep answering, limit per process
            if time.monotonic() - self._warned > 60:
                self._warned = time.monotonic()
                log.warning("rate limit: the study store is not reachable (%s); limiting per process meanwhile",
                            type(exc).__name__)
            return wait


class KeyProvider:
    """The accepted keys: the store's ``api_keys`` table (cached ``api_key_cache_s``: a revoked key
    works that much longer) plus the entries of ``api_keys`` / ``api_keys_file`` (read once). An
    unknown key reloads the table (at most once a second; see :meth:`refresh_on_miss`), so a new key
    works within a second."""

    def __init__(self, settings: Settings, store_getter: Callable[[], Any]) -> None:
        self.settings = settings
        self.store_getter = store_getter
        self._static = self._static_entries(settings)
        self._ring: KeyRing | None = None
        self._loaded_at = -math.inf
        self._lock = threading.Lock()

    @staticmethod
    def _static_entries(settings: Settings) -> list[KeyEntry]:
        out: list[KeyEntry] = []
        if settings.api_keys is not None:
            out += parse_entries(settings.api_keys.get_secret_value(), source="env")
        if settings.api_keys_file is not None:
            out += parse_entries(settings.api_keys_file.read_text(), source="file")
        return out

    def _load(self) -> KeyRing:
        entries = list(self._static)
        store = self.store_getter()
        if store is not None:
            entries += [KeyEntry(r.id, r.sha256, r.name) for r in store.list_api_keys(include_revoked=False)]
        return KeyRing(entries)

    def is_static(self, key_id: str) -> bool:
        """A key of ``api_keys`` / ``api_keys_file`` (the operator's), not of the store's table."""
        return any(e.key_id == key_id for e in self._static)

    def cached(self) -> KeyRing | None:
        """The cached ring while it is fresh (no I/O: callable on the event loop), else None."""
        ring = self._ring
        if ring is not None and time.monotonic() - self._loaded_at < self.settings.api_key_cache_s:
            return ring
        return None

    def ring(self) -> KeyRing:
        with self._lock:
            now = time.monotonic()
            if self._ring is None or now - self._loaded_at >= self.settings.api_key_cache_s:
                self._ring = self._load()
                self._loaded_at = now
            return self._ring

    def refresh_on_miss(self, min_age_s: float = 1.0) -> KeyRing:
        """A reload for a key the cache does not know (perhaps created since it was loaded).

        Reloads happen at most once per ``min_age_s``, so that requests with bad keys cannot hammer
        the store: a miss within ``min_age_s`` of the last reload waits for the next one (in a worker
        thread, without holding the lock), and a reload that happened meanwhile is shared.
        """
        asked = time.monotonic()
        with self._lock:
            wait = self._loaded_at + min_age_s - asked
        if wait > 0:
            time.sleep(wait)
        with self._lock:
            if self._ring is not None and self._loaded_at >= asked:
                return self._ring
            self._ring = self._load()
            self._loaded_at = time.monotonic()
            return self._ring


def _error(status: int, loc: list[Any], msg: str, type_: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content=error_body(loc, msg, type_), headers=headers)


def _header(scope: Scope, name: bytes) -> str | None:
    for k, v in scope.get("headers") or []:
        if k.lower() == name:
            return v.decode("latin-1")
    return None


class SecurityMiddleware:
    def __init__(self, app: Callable[..., Awaitable[None]], settings: Settings, keys: KeyProvider) -> None:
        self.app = app
        self.settings = settings
        self.keys = keys
        rate, burst = settings.api_rate_limit_per_s, settings.api_rate_limit_burst
        self.shared = (SharedBucket(rate, burst, keys.store_getter)
                       if settings.api_rate_limit_shared and rate > 0 else None)
        self.bucket = self.shared.local if self.shared is not None else TokenBucket(rate, burst)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method = scope["method"].upper()
        path = scope["path"]
        if path in OPEN_PATHS:
            await self.app(scope, receive, send)
            return

        # 1. auth
        principal: str | None = None
        auth = _header(scope, b"authorization")
        if auth is not None:
            scheme, _, token = auth.strip().partition(" ")
            token = token.strip()
            if scheme.lower() != "bearer" or not token:
                await _error(401, ["header", "Authorization"], "expected 'Authorization: Bearer <API key>'",
                             "not_authenticated", {"WWW-Authenticate": WWW_AUTHENTICATE})(scope, receive, send)
                return
            ring = self.keys.cached() or await anyio.to_thread.run_sync(self.keys.ring)
            entry = ring.verify(token)
            if entry is None:  # perhaps a key created since the cache was loaded
                entry = (await anyio.to_thread.run_sync(self.keys.refresh_on_miss)).verify(token)
            if entry is None:
                await _error(403, ["header", "Authorization"], "the API key is not valid (unknown or revoked)",
                             "invalid_api_key")(scope, receive, send)
                return
            principal = entry.key_id
            scope.setdefault("state", {})["api_key_id"] = principal
            scope["state"]["api_key_static"] = self.keys.is_static(principal)
        elif requires_key(method, path, self.settings):
            what = "this request" if method in SAFE_METHODS else f"{method} requests"
            await _error(
                401, ["header", "Authorization"],
                f"{what} need an API key: 'Authorization: Bearer <key>' (`bonn-sweep keys create`; the local "
                "stack's key is in <home>/api-key)",
                "not_authenticated", {"WWW-Authenticate": WWW_AUTHENTICATE},
            )(scope, receive, send)
            return

        # 2. rate limit
        client = scope.get("client")
        name = f"key:{principal}" if principal else f"ip:{client[0] if client else '?'}"
        if self.shared is not None:
            wait = await anyio.to_thread.run_sync(self.shared.take, name)
        else:
            wait = self.bucket.take(name)
        if wait > 0:
            rate = self.settings.api_rate_limit_per_s
            await _error(
                429, [],
                f"rate limit exceeded: at most {rate:g} requests/s (burst {self.settings.api_rate_limit_burst}) "
                f"per {'API key' if principal else 'client address'}; retry after {math.ceil(wait)} s "
                "(settings BONN_SWEEP_API_RATE_LIMIT_PER_S / _BURST)",
                "rate_limited", {"Retry-After": str(max(1, math.ceil(wait)))},
            )(scope, receive, send)
            return

        # 3. body size
        if method in BODY_METHODS:
            limit = self.settings.api_max_body_bytes
            length = _header(scope, b"content-length")
            if length is not None:
                try:
                    n = int(length)
                except ValueError:
                    await _error(400, ["header", "Content-Length"], "Content-Length is not a number",
                                 "bad_request")(scope, receive, send)
                    return
                if n > limit:
                    await self._too_large(scope, receive, send, n, limit)
                    return
            else:
                body, more, ok = bytearray(), True, True
                while more:
                    message = await receive()
                    if message["type"] != "http.request":  # disconnect
                        return
                    body += message.get("body", b"")
                    more = message.get("more_body", False)
                    if len(body) > limit:
                        ok = False
                        break
                if not ok:
                    await self._too_large(scope, receive, send, None, limit)
                    return
                receive = _replay(bytes(body), receive)
        await self.app(scope, receive, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send, n: int | None, limit: int) -> None:
        size = f"{n} bytes" if n is not None else f"more than {limit} bytes"
        await _error(413, ["body"], f"request body of {size} exceeds the limit of {limit} bytes "
                     "(setting BONN_SWEEP_API_MAX_BODY_BYTES)", "body_too_large",
                     {"Connection": "close"})(scope, receive, send)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


# -- OpenAPI: the security scheme and the answers the middleware gives --------------------------------

def _err_ref() -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}


def patch_openapi(schema: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """Add the bearer scheme, each operation's ``security`` (per :func:`requires_key`) and the 401 /
    403 / 413 / 429 answers of the middleware. Idempotent."""
    comps = schema.setdefault("components", {})
    comps.setdefault("securitySchemes", {})[SCHEME_NAME] = {
        "type": "http", "scheme": "bearer",
        "description": "an API key (`bonn-sweep keys create`; the embedded stack writes one to <home>/api-key)",
    }
    schemas = comps.setdefault("schemas", {})
    if "ErrorBody" not in schemas:  # present when a route documents it; make sure for the refs below
        from service.api.schemas import ErrorBody

        schemas["ErrorBody"] = ErrorBody.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schemas["ErrorBody"].pop("$defs", {}))
    str_header = {"schema": {"type": "string"}}
    for path, ops in schema.get("paths", {}).items():
        if path in OPEN_PATHS:
            continue
        for method, op in ops.items():
            if method.upper() not in {"GET", "HEAD", "OPTIONS", "POST", "PUT", "PATCH", "DELETE"}:
                continue
            responses = op.setdefault("responses", {})
            needed = requires_key(method, path, settings)
            op["security"] = [{SCHEME_NAME: []}] if needed else [{}, {SCHEME_NAME: []}]
            responses.setdefault("401", {
                "description": "no or malformed Authorization header" + ("" if needed else " (only if one is sent)"),
                "headers": {"WWW-Authenticate": str_header}, "content": _err_ref(),
            })
            responses.setdefault("403", {"description": "the API key is unknown or revoked", "content": _err_ref()})
            responses.setdefault("429", {
                "description": "rate limit per key, or too many active studies",
                "headers": {"Retry-After": str_header}, "content": _err_ref(),
            })
            if method.upper() in BODY_METHODS:
                responses.setdefault("413", {"description": "request body too large", "content": _err_ref()})
    return schema
