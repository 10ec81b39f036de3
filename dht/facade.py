"""DHT: the synchronous facade for training scripts; the node runs on a background event-loop thread.

>>> from dht import DHT, get_dht_time
>>> first = DHT(host="127.0.0.1")
>>> second = DHT(initial_peers=first.get_visible_addresses(), host="127.0.0.1")
>>> second.store("run/loss", 0.42, expiration_time=get_dht_time() + 60)
True
>>> first.get("run/loss")
ValueWithExpiration(value=0.42, expiration_time=...)
>>> second.store("peers", {"samples": 32}, get_dht_time() + 60, subkey="peer-A")   # a dictionary key
>>> first.get("peers", latest=True).value["peer-A"].value
{'samples': 32}

Upper layers (averaging, training) run their asyncio code on the same loop and P2P peer:
``dht.run_coroutine(fn)`` calls ``await fn(dht, node)`` there and returns its result.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import logging
import os
import threading
import weakref
from typing import Any, Awaitable, Callable, Coroutine, Iterable, Sequence, TypeVar

from .node import DHTNode, get_dht_time
from .peer.identity import PeerID
from .storage import ValueWithExpiration
from .validation import RecordValidator

__all__ = ["DHT", "get_dht_time"]
logger = logging.getLogger(__name__)

T = TypeVar("T")

# DHTs still running, shut down at interpreter exit (weakly held: an unreferenced DHT is collected as usual)
_live: "weakref.WeakSet[DHT]" = weakref.WeakSet()
EXIT_SHUTDOWN_TIMEOUT = 5.0  # seconds a DHT left running gets to leave at interpreter exit


@atexit.register
def _shutdown_at_exit() -> None:
    """Stop every DHT left running before the interpreter finalises: a background event loop (uvloop's
    above all) still running while modules are torn down can crash the process (rc 139) after the
    script itself succeeded. Registered when :mod:`dht.facade` is imported, so it runs after the
    exit hooks of the layers above (averagers, optimizers), which use the DHT while they leave."""
    for dht in list(_live):
        try:
            dht._shutdown(EXIT_SHUTDOWN_TIMEOUT, cancel_tasks=True)
        except Exception:  # exiting anyway; the next DHT still gets its turn
            logger.debug("stopping %r at exit failed", dht, exc_info=True)


async def _settle(timeout: float = 4.0) -> None:
    """Wait (at most ``timeout`` s) for the loop's other tasks, e.g. a cancelled node closing itself."""
    others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    if others:
        await asyncio.wait(others, timeout=timeout)


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:
        return asyncio.new_event_loop()


class DHT:
    """A DHT peer for synchronous code. Arguments:

    - ``initial_peers``: addresses of peers already in the DHT (``/ip4/HOST/tcp/PORT/p2p/PEERID``);
      empty to start a new DHT.
    - ``host``, ``port``: where to listen (default all interfaces, any free port).
    - ``identity_path``: Ed25519 key file (created 0600 if missing); default: ephemeral key.
    - ``client_mode``: do not listen; others never put this peer in their routing tables.
    - ``record_validators``: extra validators (e.g. :class:`dht.SchemaValidator`).
    - other keyword arguments go to :class:`dht.node.DHTNode` (``bucket_size``, ``num_replicas``, ...).
    """

    def __init__(self, initial_peers: Sequence[str] = (), host: str = "0.0.0.0", port: int = 0,
                 identity_path: str | os.PathLike | None = None, client_mode: bool = False,
                 record_validators: Iterable[RecordValidator] = (), **node_kwargs: Any):
        self._loop = _new_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="dht-event-loop", daemon=True)
        self._thread.start()
        self._shutdown_done = False
        creating = self._run(DHTNode.create(
            list(initial_peers), host=host, port=port,
            identity_path=None if identity_path is None else str(identity_path), client_mode=client_mode,
            record_validators=list(record_validators), **node_kwargs), return_future=True)
        try:
            self.node: DHTNode = creating.result()
        except BaseException:
            if not creating.done():  # interrupted (e.g. Ctrl+C) while joining: let the node close, then stop
                creating.cancel()
                with contextlib.suppress(BaseException):
                    self._run(_settle(), timeout=5.0)
            self._stop_loop()
            raise
        _live.add(self)

    def _run(self, coro: Coroutine[Any, Any, T], return_future: bool = False, timeout: float | None = None) -> Any:
        future: concurrent.futures.Future[T] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future if return_future else future.result(timeout)

    @property
    def peer_id(self) -> PeerID:
        return self.node.peer_id

    @property
    def client_mode(self) -> bool:
        return self.node.client_mode

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def store(self, key: Any, value: Any, expiration_time: float, subkey: Any = None,
              return_future: bool = False) -> bool | concurrent.futures.Future:
        """Store ``value`` under ``key`` (or under ``subkey`` of a dictionary key) until
        ``expiration_time`` (DHT time, see :func:`get_dht_time`). True if at least one replica took it."""
        return self._run(self.node.store(key, value, expiration_time, subkey), return_future)

    def get(self, key: Any, latest: bool = False,
            return_future: bool = False) -> ValueWithExpiration | None | concurrent.futures.Future:
        """The newest live value under ``key``, or None. For a dictionary key ``.value`` maps each
        subkey to a ValueWithExpiration. ``latest=True`` asks all the key's replicas and merges."""
        return self._run(self.node.get(key, latest), return_future)

    def store_many(self, items: Sequence[tuple[Any, Any, float, Any]]) -> list[bool]:
        """Store many ``(key, value, expiration_time, subkey)`` tuples in one batched operation."""
        return self._run(self.node.store_many(items))

    def get_many(self, keys: Sequence[Any], latest: bool = False) -> dict[Any, ValueWithExpiration | None]:
        return self._run(self.node.get_many(keys, latest))

    def get_visible_addresses(self) -> list[str]:
        """Addresses other peers can use to join through this one (empty in client mode)."""
        return [str(a) for a in self.node.p2p.get_visible_addresses()]

    def add_validators(self, validators: Iterable[RecordValidator]) -> None:
        """Add record validators to the node's chain (asynchronously, before any later call of this
        facade runs). Schema validators merge with those there: each governs only its own keys."""
        self._loop.call_soon_threadsafe(self.node.validator.extend, list(validators))

    def run_coroutine(self, fn: Callable[["DHT", DHTNode], Awaitable[T]], return_future: bool = False) -> Any:
        """Run ``await fn(dht, node)`` on the DHT's event loop; returns its result (or a Future)."""
        async def call() -> T:  # (any awaitable, not only a coroutine)
            return await fn(self, self.node)

        return self._run(call(), return_future)

    def shutdown(self) -> None:
        """Leave the DHT: close connections and stop the background thread (idempotent). A DHT left
        running is shut down like this at interpreter exit (with at most 5 s to leave)."""
        self._shutdown(30.0)

    def _shutdown(self, timeout: float, cancel_tasks: bool = False) -> None:
        if self._shutdown_done:
            return
        self._shutdown_done = True
        _live.discard(self)
        try:
            self._run(self.node.shutdown(), timeout=timeout)
            if cancel_tasks:  # what upper layers left on the loop, so that closing it destroys nothing pending
                self._run(_cancel_other_tasks(), timeout=timeout)
        except (concurrent.futures.TimeoutError, RuntimeError) as e:  # timed out, or the loop is gone already
            logger.debug("DHT shutdown did not finish cleanly: %s", str(e) or type(e).__name__)
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        try:
            self._loop.call_soon_threadsafe(self._loop.stop)
        except RuntimeError:  # already closed
            return
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> "DHT":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.shutdown()

    def __del__(self) -> None:
        try:
            if not self._shutdown_done and self._thread.is_alive():
                self.shutdown()
        except Exception:  # __del__ must not raise (at interpreter exit, as little as possible may run)
            logger.debug("shutting down a DHT left running failed", exc_info=True)

    def __repr__(self) -> str:
        n = len(self.node.routing_table)
        return f"DHT({self.peer_id}, {n} {'peer' if n == 1 else 'peers'} in the routing table)"


async def _cancel_other_tasks() -> None:
    current = asyncio.current_task()
    others = [t for t in asyncio.all_tasks() if t is not current]
    for task in others:
        task.cancel()
    if others:
        await asyncio.wait(others, timeout=1.0)
