"""`kdiff serve`: run the HTTP service (one uvicorn process) with a graceful SIGTERM drain."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from types import FrameType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .settings import Settings

log = logging.getLogger("kdiff.serve")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # KDIFF_HOST / KDIFF_PORT: what the image's entrypoint passes here, honoured by a bare `kdiff serve` too
    host = os.environ.get("KDIFF_HOST") or "127.0.0.1"
    parser.add_argument("--host", default=host, help="bind address (KDIFF_HOST; 0.0.0.0 in containers)")
    parser.add_argument("--port", type=int, default=os.environ.get("KDIFF_PORT") or 8000, help="(KDIFF_PORT)")
    parser.add_argument("--model-store", help="model store folder (KDIFF_MODEL_STORE)")
    parser.add_argument("--models", help="comma-separated models to load (KDIFF_MODELS); default all")
    parser.add_argument("--device", help="auto | cpu | cuda | cuda:N | mps (KDIFF_DEVICE)")
    parser.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"], help="(KDIFF_DTYPE)")
    parser.add_argument("--batching", choices=["iteration", "request", "serial"], help="(KDIFF_BATCHING)")
    parser.add_argument("--max-batch-rows", type=int, help="rows per model call (KDIFF_MAX_BATCH_ROWS)")
    parser.add_argument("--max-queue", type=int, help="queued jobs before 429 (KDIFF_MAX_QUEUE)")
    parser.add_argument("--drain-timeout", type=float, help="SIGTERM drain seconds (KDIFF_DRAIN_TIMEOUT_S)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    ray = parser.add_argument_group("Ray Serve (the `ray` extra; README 'Scaling out')")
    ray.add_argument("--ray", action="store_true", help="serve on Ray Serve: ingress + engine replicas")
    ray.add_argument("--address", help="Ray cluster (auto, ray://head:10001); default: a local one")
    ray.add_argument("--engines", type=int, default=1, help="engine slots (replicas), one device each")
    ray.add_argument("--gpus-per-engine", type=float, default=0.0, help="num_gpus per engine (1 on GPU)")
    ray.add_argument(
        "--ingress-replicas",
        type=int,
        default=1,
        help="ingress replicas (own cluster: how many listen on --port; with --address: autoscaling minimum)",
    )
    ray.add_argument(
        "--ingress-max-replicas",
        type=int,
        help="autoscaling maximum of the ingress replicas (with --address only)",
    )
    ray.add_argument("--placement", help="models per engine slot, e.g. 'digits;sd15,sdxl' (default: all)")


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    names = {
        "model_store": "model_store",
        "models": "models",
        "device": "device",
        "dtype": "dtype",
        "batching": "batching",
        "max_batch_rows": "max_batch_rows",
        "max_queue": "max_queue",
        "drain_timeout": "drain_timeout_s",
    }
    return {field: getattr(args, arg) for arg, field in names.items() if getattr(args, arg, None) is not None}


# What a start-up failure of these types says is meant for the operator (a missing model, a bad
# setting, a folder that cannot be written, a Redis that does not answer): one line, no traceback.
OPERATOR_ERRORS = (RuntimeError, ValueError, OSError)
Message = MutableMapping[str, Any]


def operator_line(exc: BaseException) -> str:
    from service.serving.errors import StartupError

    return str(exc) if isinstance(exc, StartupError) else f"{type(exc).__name__}: {exc}"


def one_line_startup_failure(app: Any) -> Callable[..., Awaitable[None]]:
    """``app`` with its start-up failure told in one line: starlette hands uvicorn the traceback of
    what the lifespan raised, a wall of 80-120 lines in front of the one that says what is wrong.
    Other failures (bugs) keep their traceback."""

    async def asgi(
        scope: Message, receive: Callable[[], Awaitable[Message]], send: Callable[[Message], Awaitable[None]]
    ) -> None:
        if scope["type"] != "lifespan":
            return await app(scope, receive, send)

        async def said_once(message: Message) -> None:
            exc = getattr(app.state, "startup_error", None)
            if message["type"] == "lifespan.startup.failed" and isinstance(exc, OPERATOR_ERRORS):
                log.debug("start-up failed", exc_info=exc)  # the traceback, with --log-level debug
                message = {**message, "message": f"kdiff serve: cannot start: {operator_line(exc)}"}
            await send(message)

        await app(scope, receive, said_once)

    return asgi


def port_in_use(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be listened on alone (None: it can), tried with a plain bind."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a closed server's TIME_WAIT is fine
        try:
            sock.bind((host, port))
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


def read_settings(args: argparse.Namespace) -> Settings | None:
    """The settings (environment, then the command's options), with a warning for each KDIFF_*
    variable that is no setting; None after one line per invalid setting on stderr."""
    from pydantic import ValidationError

    from .settings import Settings, explain, unknown_variables

    for line in unknown_variables(os.environ):
        log.warning("%s", line)
    try:
        return Settings(**_overrides(args))
    except ValidationError as exc:  # one line per setting, named as the operator set it
        for line in explain(exc):
            print(f"kdiff serve: {line}", file=sys.stderr)
        return None


def main(args: argparse.Namespace) -> int:
    if getattr(args, "ray", False):
        from service.deploy.cli import serve_ray

        # its own cluster's replicas read this environment: a bad setting is said here in one line, not
        # as each replica's traceback while Serve restarts it
        if args.address is None and read_settings(args) is None:
            return 2
        return serve_ray(args, _overrides(args))
    from .malloc import cap_arenas, start_trimming

    cap_arenas()  # before any thread allocates: RSS stays flat under steady load
    start_trimming()  # and what a busier moment allocated goes back to the OS
    import uvicorn

    from service.serving.errors import StartupError
    from service.serving.jobstore import StateCorrupt

    from .app import create_app
    from .comfy.sockets import WS_MAX_MESSAGE_BYTES, WS_MAX_QUEUE
    from .protocol import with_header_timeout

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    read = read_settings(args)
    if read is None:
        return 2
    if busy := port_in_use(args.host, args.port):  # before the models load (minutes for large ones)
        print(
            f"kdiff serve: {args.host}:{args.port} is in use ({busy}); free it or choose --port",
            file=sys.stderr,
        )
        return 2
    settings = read  # (narrowed for the drain below)
    try:
        settings.check_folders()
        app = create_app(settings)
    except (
        StateCorrupt,
        StartupError,
        OSError,
        ValueError,
    ) as exc:  # one clear line, no traceback; files left as they are
        print(f"kdiff serve: cannot start: {operator_line(exc)}", file=sys.stderr)
        return 2
    state = app.state.service

    class DrainingServer(uvicorn.Server):
        """First SIGTERM/SIGINT: readiness off, new work 503, running jobs finish (drain), then exit."""

        _drain_task: asyncio.Future[None] | None = None

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            if self._drain_task is not None or not state.ready:
                super().handle_exit(sig, frame)  # second signal, or still starting: exit now
                return
            log.info(
                "signal %s: draining for up to %.0f s", signal.Signals(sig).name, settings.drain_timeout_s
            )
            loop = asyncio.get_running_loop()
            self._drain_task = asyncio.Future()  # marks the drain as started
            loop.call_soon_threadsafe(lambda: loop.create_task(self._drain()))

        async def _drain(self) -> None:
            try:
                await state.drain(settings.drain_timeout_s)
            finally:
                self.should_exit = True

    config = uvicorn.Config(
        one_line_startup_failure(app),
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=5,
        lifespan="on",
        http=with_header_timeout(settings.header_timeout_s, settings.send_timeout_s),
        timeout_keep_alive=settings.keep_alive_s,
        limit_concurrency=settings.max_connections,
        ws_max_size=WS_MAX_MESSAGE_BYTES,
        ws_max_queue=WS_MAX_QUEUE,
    )
    DrainingServer(config).run()
    return 0
