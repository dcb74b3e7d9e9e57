"""`kdiff serve --ray`: deploy the Ray Serve application (service/deploy/ray_serve.py) and wait.

Without ``--address`` a Ray cluster of its own is started in this process, always: an exported
``RAY_ADDRESS`` or a cluster left by ``ray start`` on this machine is not joined (``ray.init`` would
join either when given no address). With ``--address`` (``auto``, ``host:port``, ``ray://head:10001``)
the application is deployed on that cluster. Ctrl-C / SIGTERM stops only what this command started:
its application always (engine replicas drain their running jobs first); Serve, if Serve was not
running on that cluster before and no other application is left on it; the cluster, if it is its own.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import threading
from typing import Any

from service.api.cli import port_in_use


def serve_running() -> bool:
    """Whether Serve's controller runs on the connected cluster (someone started Serve there)."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    except ValueError:
        return False
    return True


# the exception line that ends a traceback: "service.serving.errors.StartupError: the default model: ..."
EXCEPTION_LINE = re.compile(r"^(?:[\w.]+\.)?(\w*(?:Error|Exception|Exit)): (.+)$")


def deploy_failures(messages: dict[str, str]) -> list[str]:
    """A line per deployment whose replicas failed to start, from the messages Serve keeps for them
    (``serve.status()``: "failed to start 3 times in a row ... Error:" and the constructor's traceback):
    the exception that ended the traceback; a StartupError's message is the service's own line."""
    out = []
    for name, message in messages.items():
        raised = [m for line in message.splitlines() if (m := EXCEPTION_LINE.match(line.strip()))]
        if raised:
            kind, why = raised[-1].groups()
            out.append(f"{name}: {why}" if kind == "StartupError" else f"{name}: {kind}: {why}")
    return out


def serve_ray(args: argparse.Namespace, settings: dict[str, Any]) -> int:
    import ray
    from ray import serve

    from .ray_serve import APP_NAME, build_app

    own_cluster = args.address is None
    if own_cluster and (busy := port_in_use(args.host, args.port)):
        # the ingress listens with SO_REUSEPORT, which would share the port with whatever holds it (another
        # kdiff serve --ray: two apps answering in turn), so it is checked here with a plain bind
        print(f"kdiff serve --ray: {args.host}:{args.port} is in use ({busy}); free it or choose --port")
        return 2
    # Ray starts workers at nice 15; here they are the service (docs/BENCHMARKS.md "Ray Serve")
    if own_cluster:
        os.environ.setdefault("RAY_worker_niceness", "0")
    # "local": a new cluster, whatever RAY_ADDRESS or /tmp/ray/ray_current_cluster say
    ray.init(
        address="local" if own_cluster else args.address, include_dashboard=False if own_cluster else None
    )
    own_serve = not serve_running()
    if not own_cluster and APP_NAME in serve.status().applications:
        print(
            f"kdiff serve --ray: the cluster already runs a Serve application {APP_NAME!r}; not replacing it"
        )
        ray.shutdown()
        return 2
    build_args: dict[str, Any] = {
        "engines": args.engines,
        "settings": {k: [str(i) for i in v] if isinstance(v, list) else str(v) for k, v in settings.items()},
        "num_gpus": args.gpus_per_engine,
        "ingress_min_replicas": args.ingress_replicas,
        "ingress_max_replicas": max(args.ingress_replicas, args.ingress_max_replicas or 0),
    }
    if own_cluster:
        # One host: HTTP goes straight to the ingress replica's own listener on --port (deploy/hop.py;
        # Serve's proxy cost about 0.1x of a digits request) and Serve runs no proxy.
        serve.start(proxy_location="Disabled")
        build_args.update(http_port=args.port, http_host=args.host)
    else:  # a cluster of several hosts: Serve's proxy on every node, wherever the ingress replicas run
        serve.start(http_options={"host": args.host, "port": args.port})
    if args.placement:  # "digits;sd15,sdxl": one group per engine slot
        build_args["placement"] = [[m for m in g.split(",") if m] for g in args.placement.split(";")]
    try:
        serve.run(build_app(build_args), name=APP_NAME, route_prefix="/")
    except RuntimeError:  # "Deploying application kdiff failed": say why in a line per replica
        app = serve.status().applications.get(APP_NAME)
        failed = deploy_failures({n: d.message for n, d in app.deployments.items()} if app else {})
        if not failed:
            raise
        for line in failed:
            print(f"kdiff serve --ray: cannot start: {line}", file=sys.stderr)
        if not own_cluster:
            serve.delete(APP_NAME)
        if own_serve:
            serve.shutdown()
        ray.shutdown()
        return 3
    where = (
        "its own Ray cluster" if own_cluster else "Ray cluster " + str(ray.get_runtime_context().gcs_address)
    )
    print(
        f"kdiff on Ray Serve: http://{args.host}:{args.port}/ ({args.engines} engine slot(s)) on {where}; "
        f"gcs={ray.get_runtime_context().gcs_address}",
        flush=True,
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    serve.delete(APP_NAME)  # engine replicas drain (their __del__ runs the service's shutdown)
    if own_serve and (own_cluster or not serve.status().applications):
        serve.shutdown()  # Serve was started here and nothing else runs on it
    ray.shutdown()  # stops the cluster if it is this process's own; else only disconnects
    return 0
