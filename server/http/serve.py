"""`modeldeploy serve SOURCE`: open the port, load in the background, drain on SIGTERM.

Signals are ours, not uvicorn's: uvicorn's handler stops accepting and closes
idle connections at once, which during a rolling update drops requests that the
Service still routes here. We instead flip `/ready` to `draining` (the endpoint
controller takes the pod out), refuse new inference with 503, let in-flight
requests and streams finish (bounded by `--drain-timeout`), then stop the server
and exit 0. A second SIGTERM/SIGINT stops at once (exit 128+signal).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator

import prometheus_client
import uvicorn
from fastapi import FastAPI
from modeldeploy.server import logs
from modeldeploy.server.http import settings as settings_mod
from modeldeploy.server.http.app import create_app
from modeldeploy.server.http.loader import busy_threads, load_model
from modeldeploy.server.http.runtime import ServerRuntime

log = logging.getLogger("modeldeploy.http")

#: How long a failed server keeps answering `/ready: failed` before exiting, so a
#: probe or a human polling it sees the reason (the termination log has it too).
FAILED_LINGER_S = 2.0
_DRAIN_POLL_S = 0.05


class GracefulServer(uvicorn.Server):
    """uvicorn.Server with drain-on-SIGTERM and exit-now on a second signal."""

    def __init__(self, config: uvicorn.Config, runtime: ServerRuntime) -> None:
        super().__init__(config)
        self.runtime = runtime
        self.signals_seen = 0
        self.bound_port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:  # replaces uvicorn's handlers
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        originals = {sig: signal.signal(sig, self._on_signal) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in originals.items():
                signal.signal(sig, handler)

    def _on_signal(self, sig: int, _frame: object) -> None:
        self.signals_seen += 1
        name = signal.Signals(sig).name
        if self.signals_seen == 1:
            log.info("draining", extra={"signal": name, "inflight": self.runtime.inflight})
            self.runtime.lifecycle.drain()
            if self._loop is not None:
                self._loop.call_soon_threadsafe(self._spawn, self._drain())
            else:
                self.should_exit = True
            return
        log.warning("second signal: stopping now", extra={"signal": name})
        self.runtime.exit_code = 128 + sig
        self.should_exit = True
        self.force_exit = True
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._abort_connections)

    def _abort_connections(self) -> None:
        """Drop every open connection (uvicorn would wait for streams to end)."""
        for connection in list(self.server_state.connections):
            transport = getattr(connection, "transport", None)
            if transport is not None:
                transport.abort()

    def _spawn(self, coro: object) -> None:
        task = asyncio.ensure_future(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _drain(self) -> None:
        """Wait for in-flight inference (bounded), then let uvicorn close the rest."""
        deadline = time.monotonic() + self.runtime.settings.drain_timeout
        while self.runtime.inflight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(_DRAIN_POLL_S)
        if self.runtime.inflight > 0:
            log.warning(
                "drain timeout: cutting in-flight requests",
                extra={"inflight": self.runtime.inflight},
            )
        self.config.timeout_graceful_shutdown = max(1, int(deadline - time.monotonic()) + 1)
        log.info("drained", extra={"inflight": self.runtime.inflight})
        self.should_exit = True

    def stop_after_failure(self) -> None:
        """Called by the loader on failure: keep `/ready: failed` visible briefly, then exit."""

        async def later() -> None:
            await asyncio.sleep(FAILED_LINGER_S)
            self.should_exit = True

        self._spawn(later())

    async def serve(self, sockets: list | None = None) -> None:  # type: ignore[override]
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    async def startup(self, sockets: list | None = None) -> None:  # type: ignore[override]
        await super().startup(sockets)
        if self.started and self.servers:
            sock = next(iter(self.servers[0].sockets), None)
            if sock is not None:
                self.bound_port = sock.getsockname()[1]
            log.info(
                "listening",
                extra={
                    "host": self.config.host,
                    "port": self.bound_port,
                    "model": self.runtime.model_name,
                },
            )

    @contextlib.asynccontextmanager
    async def lifespan(self, _app: FastAPI) -> AsyncIterator[None]:
        """Start the background load when the app starts; stop the engine at the end."""
        task = asyncio.ensure_future(load_model(self.runtime, self.stop_after_failure))
        self._tasks.add(task)
        try:
            yield
        finally:
            task.cancel()
            engine = self.runtime.engine
            close = getattr(engine, "close", None)
            if callable(close):
                result = close()
                if asyncio.iscoroutine(result):
                    await result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Every serve option of DESIGN.md, each also readable from MODELDEPLOY_<NAME>."""
    settings_mod.add_arguments(parser)


def _configure_logging(level: str) -> None:
    logs.configure(level.upper())
    logging.captureWarnings(True)  # library warnings become JSON records, not raw stderr
    if level != "debug":  # uvicorn's startup chatter; our own 'listening' line replaces it
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
        logging.getLogger("uvicorn.access").setLevel(logging.WARNING)


def run(args: argparse.Namespace) -> int:
    """Serve until drained (0), failed (1, or 2 for bad input) or force-stopped (128+signal)."""
    settings = settings_mod.settings_from_args(args)
    api_keys = settings_mod.read_api_keys(settings.api_key_file)
    _configure_logging(settings.log_level)
    prometheus_client.disable_created_metrics()
    runtime = ServerRuntime(settings, api_keys=api_keys)
    config = uvicorn.Config(
        app=None,  # set below: the app's lifespan belongs to the server object
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        lifespan="on",
        server_header=False,
        timeout_keep_alive=5,
        timeout_graceful_shutdown=int(settings.drain_timeout) + 1,
    )
    server = GracefulServer(config, runtime)
    config.app = create_app(runtime, lifespan=server.lifespan)
    server.run()
    code = runtime.exit_code
    if server.force_exit or busy_threads():
        # "Stop now", or a load still running in C code: neither the engine's scheduler
        # thread nor a loader thread may delay (or crash) interpreter shutdown.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code
