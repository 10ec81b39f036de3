"""The dashboard's web server (aiohttp), run on the peer's own event loop (the DHT's).

Routes:

- ``/``: the page (``static/index.html``); ``/static/NAME``: its script and style sheet, read from the
  package once at start (no CDN, no other files: a path outside that list is a 404);
- ``/api/status``: the status JSON of :func:`swarm.status.collect_status` (schema version 1);
- ``/events``: server-sent events, one ``data: {status JSON}`` message a second (``retry: 2000``:
  browsers reconnect 2 s after losing the peer);
- ``/metrics``: the peer's Prometheus text (:meth:`swarm.metrics.Metrics.render`), 404 without metrics.

A local flood cannot load the peer: :class:`StatusCache` builds the status at most once per
``interval`` (1 s) however many clients ask, all of them sharing one build; ``/metrics`` renders at
most twice a second; at most
``max_sse_clients`` (16) event streams are open at once (beyond: 503); the page and its files are
served from memory. Every response carries a strict Content-Security-Policy (scripts and styles only
from this server, no inline code) and ``X-Content-Type-Options: nosniff``. While the server listens on
a loopback address, a request whose ``Host`` is a DNS name other than ``localhost`` is refused (403):
that is how a web site in the same browser would reach a local server through DNS rebinding.

Ports: ``port=None`` (the command line's default) takes :data:`DEFAULT_PORT` (7780) or, when another
process holds it, the next free one of the :data:`PORT_FALLBACKS` (20) after it, then any free port;
``0`` is any free port; any other port is that one or :class:`DashboardError`.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import json
import logging
import math
import time
from importlib import resources
from typing import Any, Awaitable, Callable

from aiohttp import web

from .options import DEFAULT_PORT, PORT_FALLBACKS

__all__ = ["DEFAULT_PORT", "PORT_FALLBACKS", "STATUS_INTERVAL", "MAX_SSE_CLIENTS", "DashboardError",
           "DashboardServer", "StatusCache", "make_app", "start_dashboard", "serve_for", "close_for", "status_json"]

logger = logging.getLogger(__name__)

STATUS_INTERVAL = 1.0  # seconds: the status is built at most this often; /events pushes it this often
MAX_SSE_CLIENTS = 16  # event streams open at once
METRICS_INTERVAL = 0.5  # seconds: /metrics renders at most this often (scrapers come every 15 s or so)
SSE_RETRY_MS = 2000  # the browser reconnects this long after the stream broke
SHUTDOWN_TIMEOUT = 2.0  # seconds requests in flight get when the server stops
ERROR_LOG_INTERVAL = 60.0  # seconds between two warnings that building the status failed

STATIC_FILES = {  # name -> content type: the only files /static serves
    "index.html": "text/html; charset=utf-8",
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}
SECURITY_HEADERS = {
    "Content-Security-Policy": ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                                "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}

StatusSource = Callable[[], Awaitable[dict]]


class DashboardError(Exception):
    """The dashboard cannot start (its port is taken, the address is not local) or has no status yet."""


def _finite(value: Any, depth: int = 0) -> Any:
    """``value`` with NaN and infinities as None (JSON has neither), tuples as lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if depth > 32:
        raise ValueError("the status is nested more than 32 levels deep")
    if isinstance(value, dict):
        return {str(k): _finite(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v, depth + 1) for v in value]
    return value


def status_json(status: dict) -> bytes:
    """The status as compact UTF-8 JSON on one line (so it fits an SSE ``data:`` line); NaN -> null."""
    return json.dumps(_finite(status), separators=(",", ":"), allow_nan=False, ensure_ascii=False).encode()


class StatusCache:
    """The status JSON, built by ``source`` at most once per ``interval`` seconds: callers within the
    interval get the cached bytes, and callers arriving while a build runs wait for that build. If a
    build fails, the last good status is served again (the failure is logged at most once a minute);
    with none yet, :class:`DashboardError`."""

    def __init__(self, source: StatusSource, interval: float = STATUS_INTERVAL,
                 clock: Callable[[], float] = time.monotonic):
        self._source = source
        self.interval = interval
        self._clock = clock
        self._lock = asyncio.Lock()
        self._body: bytes | None = None
        self._built_at = -math.inf
        self._logged_at = -math.inf
        self.builds = 0  # how many times the source ran (tests check the bound)

    async def get(self) -> bytes:
        if self._clock() - self._built_at < self.interval and self._body is not None:
            return self._body
        async with self._lock:
            if self._clock() - self._built_at < self.interval and self._body is not None:
                return self._body  # built by the caller we waited for
            self.builds += 1
            try:
                body = status_json(await self._source())
            except asyncio.CancelledError:
                raise
            except Exception as e:  # logged (rate-limited); the last good status is served
                if self._clock() - self._logged_at >= ERROR_LOG_INTERVAL:
                    self._logged_at = self._clock()
                    logger.warning("dashboard: building the status failed: %s: %s", type(e).__name__, str(e)[:300],
                                   exc_info=logger.isEnabledFor(logging.DEBUG))
                self._built_at = self._clock()  # a failing source is not retried more often either
                if self._body is None:
                    raise DashboardError(f"no status yet ({type(e).__name__})") from e
                return self._body
            self._body, self._built_at = body, self._clock()
            return body


def _load_static() -> dict[str, bytes]:
    folder = resources.files("swarm.dashboard") / "static"
    return {name: (folder / name).read_bytes() for name in STATIC_FILES}


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _host_allowed(host_header: str) -> bool:
    """True for ``localhost`` (and ``*.localhost``) and IP literals, with or without a port."""
    host = host_header.strip().lower()
    if host.startswith("["):  # [v6]:port
        host = host[1:].split("]", 1)[0]
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def make_app(status: StatusCache, metrics: Any = None, *, max_sse_clients: int = MAX_SSE_CLIENTS,
             check_host: bool = True) -> web.Application:
    """The aiohttp application (see the module docstring). ``metrics``: an object with ``render() -> bytes``
    (:class:`swarm.metrics.Metrics`) or None; ``check_host``: refuse DNS names other than localhost."""
    static = _load_static()
    closing = asyncio.Event()
    streams = {"open": 0}

    @web.middleware
    async def host_guard(request: web.Request, handler: Any) -> web.StreamResponse:
        if check_host and not _host_allowed(request.headers.get("Host", "127.0.0.1")):
            return web.Response(status=403, text="dashboard: refused a request for another host name (DNS "
                                                 "rebinding protection): open it as http://127.0.0.1:PORT/\n")
        return await handler(request)

    async def add_security_headers(_request: web.Request, response: web.StreamResponse) -> None:
        response.headers.update(SECURITY_HEADERS)

    async def page(_request: web.Request) -> web.Response:
        return web.Response(body=static["index.html"], headers={"Content-Type": STATIC_FILES["index.html"],
                                                                "Cache-Control": "no-cache"})

    async def static_file(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in static:
            raise web.HTTPNotFound(text="no such file\n")
        return web.Response(body=static[name], headers={"Content-Type": STATIC_FILES[name],
                                                        "Cache-Control": "no-cache"})

    async def api_status(_request: web.Request) -> web.Response:
        try:
            body = await status.get()
        except DashboardError as e:
            return web.Response(status=503, text=f"{e}\n", headers={"Retry-After": "1"})
        return web.Response(body=body, headers={"Content-Type": "application/json; charset=utf-8",
                                                "Cache-Control": "no-store"})

    async def events(request: web.Request) -> web.StreamResponse:
        if streams["open"] >= max_sse_clients:
            return web.Response(status=503, text=f"too many dashboard viewers (at most {max_sse_clients})\n",
                                headers={"Retry-After": "5"})
        streams["open"] += 1
        try:
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8",
                                                   "Cache-Control": "no-store", "X-Accel-Buffering": "no"})
            await response.prepare(request)
            await response.write(f"retry: {SSE_RETRY_MS}\n\n".encode())
            while not closing.is_set():
                try:
                    body = await status.get()
                    await response.write(b"data: " + body + b"\n\n")
                except DashboardError:
                    await response.write(b": no status yet\n\n")  # a comment: keeps the stream alive
                try:
                    await asyncio.wait_for(closing.wait(), status.interval)
                except asyncio.TimeoutError:
                    pass
            return response
        except ConnectionError:  # the viewer left (aiohttp's ClientConnectionResetError is one)
            return response
        finally:
            streams["open"] -= 1

    rendered: dict[str, Any] = {"at": -math.inf, "body": b""}

    async def metrics_text(_request: web.Request) -> web.Response:
        if metrics is None:
            raise web.HTTPNotFound(text="this peer keeps no metrics\n")
        from swarm.metrics import CONTENT_TYPE

        if time.monotonic() - rendered["at"] >= METRICS_INTERVAL:  # a flood of scrapes renders twice a second
            rendered["body"], rendered["at"] = metrics.render(), time.monotonic()
        return web.Response(body=rendered["body"], headers={"Content-Type": CONTENT_TYPE})

    async def on_shutdown(_app: web.Application) -> None:
        closing.set()  # event streams end at once instead of holding the shutdown

    app = web.Application(middlewares=[host_guard], client_max_size=1024)
    app.on_response_prepare.append(add_security_headers)
    app.on_shutdown.append(on_shutdown)
    app.router.add_get("/", page)
    app.router.add_get("/static/{name}", static_file)
    app.router.add_get("/api/status", api_status)
    app.router.add_get("/events", events)
    app.router.add_get("/metrics", metrics_text)
    return app


class DashboardServer:
    """A running dashboard: ``url`` (open it in a browser), ``port``, ``runner`` (aiohttp), ``close()``."""

    def __init__(self, runner: web.AppRunner, host: str, port: int, status: StatusCache):
        self.runner, self.host, self.port, self.status = runner, host, port, status
        self._closed = False

    @property
    def url(self) -> str:
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self.host, self.host)
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}/"

    async def close(self) -> None:
        """Stop listening and end the event streams (within about 2 s); idempotent."""
        if not self._closed:
            self._closed = True
            await self.runner.cleanup()

    def __repr__(self) -> str:
        return f"DashboardServer({self.url})"


async def start_dashboard(node: Any, view: Any = None, metrics: Any = None, host: str = "127.0.0.1",
                          port: int | None = None, *, source: StatusSource | None = None,
                          interval: float = STATUS_INTERVAL,
                          max_sse_clients: int = MAX_SSE_CLIENTS) -> DashboardServer:
    """Serve the dashboard of ``node`` (a :class:`dht.DHTNode`; call this on its event loop) with the
    local :class:`swarm.status.PeerView` ``view`` and :class:`swarm.metrics.Metrics` ``metrics`` (either
    may be None). ``host`` 127.0.0.1 by default (this machine only); ``port``: None = 7780 or the next
    free one, 0 = any free port, else exactly that port. ``source`` replaces
    :func:`swarm.status.collect_status` (which it calls with the view's ``run_id``). Raises
    :class:`DashboardError` if it cannot listen."""
    if source is None:
        from swarm.status import collect_status

        async def source() -> dict:
            return await collect_status(node, run_id=getattr(view, "run_id", None), local=view)

    cache = StatusCache(source, interval)
    app = make_app(cache, metrics, max_sse_clients=max_sse_clients, check_host=_is_loopback(host))
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT)
    await runner.setup()
    candidates = [port] if port is not None else [DEFAULT_PORT + i for i in range(PORT_FALLBACKS + 1)] + [0]
    for i, candidate in enumerate(candidates):
        site = web.TCPSite(runner, host, candidate)
        try:
            await site.start()
        except OSError as e:
            await site.stop()
            if e.errno == errno.EADDRINUSE and i + 1 < len(candidates):
                continue
            await runner.cleanup()
            where = f"{host}:{candidate}" if ":" not in host else f"[{host}]:{candidate}"
            hint = " (another process holds it: give --dashboard-port another port, 0 for any, or off)" \
                if e.errno == errno.EADDRINUSE else ""
            raise DashboardError(f"cannot serve the dashboard on {where}: {e.strerror or e}{hint}") from None
        break
    bound = runner.addresses[0][1]
    server = DashboardServer(runner, host, bound, cache)
    logger.info("dashboard: %s", server.url)
    return server


def serve_for(dht: Any, view: Any = None, metrics: Any = None, host: str = "127.0.0.1",
              port: int | None = None) -> DashboardServer:
    """:func:`start_dashboard` on the event loop of a :class:`dht.DHT` facade (blocks until it listens)."""
    async def start(_dht: Any, node: Any) -> DashboardServer:
        return await start_dashboard(node, view, metrics, host, port)

    return dht.run_coroutine(start)


def close_for(dht: Any, server: DashboardServer) -> None:
    """Stop a dashboard :func:`serve_for` started (before the DHT shuts down)."""
    async def close(_dht: Any, _node: Any) -> None:
        await server.close()

    try:
        dht.run_coroutine(close)
    except Exception:  # the peer is leaving anyway; the socket closes with the loop
        logger.debug("stopping the dashboard failed", exc_info=True)
