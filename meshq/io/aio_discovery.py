"""mDNS discovery on the caller's asyncio event loop (``meshq.aio``), with zeroconf's ``AsyncZeroconf``.

Theory of operation
-------------------
The same announcement and the same filter as ``meshq.io.discovery.Discovery`` (whose
``service_info`` and ``accept`` it inherits: TXT records with no secret, peers of another
cluster, protocol version or cluster key ignored, accepted peers handed to the runtime as
``PeerDiscovered``), but python-zeroconf runs on the event loop of the ``meshq.aio.Node``
that started it: ``AsyncZeroconf`` created inside the running loop uses that loop, so the
node has no zeroconf thread. Registration, browsing and resolving (``AsyncServiceInfo``)
are tasks on the loop; nothing blocks it.

``stop`` may be called from any thread (``meshq.Node.stop`` runs in a worker thread, and a
node that left stops announcing from its runtime thread): it hands the close to the loop
and waits for it a bounded time; ``async_stop`` is the same on the loop. Both are idempotent.
With ``interfaces=None`` a task re-checks the host's IPv4 addresses every
``rescan_interval_s`` and restarts zeroconf when they change, as the threaded version does.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from typing import Any

from meshq.io.discovery import SERVICE_TYPE, Discovery, local_ipv4_addresses, open_zeroconf

log = logging.getLogger("meshq.discovery")

RESOLVE_TIMEOUT_MS = 1500
STOP_WAIT_S = 3.0


class AsyncDiscovery(Discovery):
    """Announces this node and feeds discovered peers to the runtime, on ``loop`` (see the module docstring)."""

    def __init__(self, *args: Any, loop: asyncio.AbstractEventLoop, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.loop = loop
        self._aiozc: Any = None
        self._tasks: set[asyncio.Task] = set()
        self._watch_task: asyncio.Task | None = None
        self._closing: asyncio.Future | None = None

    async def async_start(self) -> None:
        await self._async_open()
        if self.interfaces is None:
            self._watch_task = self.loop.create_task(self._async_watch())

    def start(self) -> None:  # the threaded entry point has no meaning here
        raise RuntimeError("AsyncDiscovery starts with `await async_start()` on its event loop")

    def _spawn(self, coroutine: Any) -> None:
        task = self.loop.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _async_open(self) -> None:
        from zeroconf.asyncio import AsyncServiceBrowser, AsyncZeroconf

        interfaces = list(self.interfaces) if self.interfaces is not None else None
        self._addresses = local_ipv4_addresses() if interfaces is None else list(interfaces)
        aiozc = open_zeroconf(interfaces, kind=AsyncZeroconf)
        info = self.service_info() if self.role == "storage" else None  # a client introduces itself with hello
        self._aiozc, self._info = aiozc, info
        if info is not None:
            self._spawn(self._async_register(aiozc, info))
        self._browser = AsyncServiceBrowser(aiozc.zeroconf, SERVICE_TYPE, handlers=[self._on_async_change])

    async def _async_register(self, aiozc: Any, info: Any) -> None:
        try:
            # Node ids are unique, so probing for name conflicts buys nothing but 1.2 s.
            announced = await aiozc.async_register_service(info, cooperating_responders=True)
            await announced
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # zeroconf raises its own error types; never kill the node for it
            if not self._stop.is_set():
                log.warning("mDNS registration of %s failed: %s", self.node_id, exc)

    def _on_async_change(self, zeroconf: Any, service_type: str, name: str, state_change: Any) -> None:
        from zeroconf import ServiceStateChange

        if state_change in (ServiceStateChange.Added, ServiceStateChange.Updated) and not self._stop.is_set():
            self._spawn(self._resolve(zeroconf, service_type, name))

    async def _resolve(self, zeroconf: Any, service_type: str, name: str) -> None:
        from zeroconf.asyncio import AsyncServiceInfo

        info = AsyncServiceInfo(service_type, name)
        try:
            found = await info.async_request(zeroconf, RESOLVE_TIMEOUT_MS)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # resolution can fail while zeroconf shuts down
            log.debug("could not resolve %s: %s", name, exc)
            return
        if not self._stop.is_set():
            self.accept(name, info if found else None)

    async def _async_watch(self) -> None:
        while not self._stop.is_set():
            await asyncio.sleep(self.rescan_interval_s)
            current = local_ipv4_addresses()
            if current != self._addresses and not self._stop.is_set():
                log.info("network interfaces changed (%s -> %s); restarting mDNS", self._addresses, current)
                await self._async_close()
                if not self._stop.is_set():
                    await self._async_open()

    async def _async_close(self) -> None:
        aiozc, info, browser = self._aiozc, self._info, self._browser
        self._aiozc = self._info = self._browser = None
        if aiozc is None:
            return
        try:
            if browser is not None:
                await browser.async_cancel()
            if info is not None:
                await aiozc.async_unregister_service(info)
        except Exception as exc:  # best effort on the way out
            log.debug("mDNS unregister failed: %s", exc)
        finally:
            await aiozc.async_close()

    async def async_stop(self) -> None:
        """Stop announcing and browsing (on the loop). Idempotent: a second call waits for the first."""
        if self._closing is None:
            self._closing = self.loop.create_future()
            self._stop.set()
            try:
                current = asyncio.current_task()
                pending = [t for t in (*self._tasks, self._watch_task) if t is not None and t is not current]
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
                await self._async_close()
            finally:
                self._closing.set_result(None)
        else:
            await asyncio.shield(self._closing)

    def stop(self) -> None:
        """Stop from any thread: on the loop's own thread the close is scheduled; elsewhere it runs on the loop and
        this waits for it (at most ``STOP_WAIT_S``; a loop that no longer runs has nothing left to close)."""
        if self._closing is not None and self._closing.done():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:
            self._spawn(self.async_stop())
            return
        if self.loop.is_closed() or not self.loop.is_running():
            self._stop.set()
            return
        try:
            asyncio.run_coroutine_threadsafe(self.async_stop(), self.loop).result(STOP_WAIT_S)
        except (concurrent.futures.TimeoutError, RuntimeError) as exc:
            log.debug("mDNS stop on the event loop did not finish: %r", exc)
