"""`kdiff serve --ray`: deploy the Ray Serve application (service/deploy/ray_serve.py) and wait.

Without ``--address`` a local Ray cluster is started in this process; with one (``auto``, or
``ray://head:10001``) the application is deployed on that cluster. Ctrl-C / SIGTERM deletes the
application (engine replicas drain their running jobs first) and stops the local cluster.
"""

from __future__ import annotations

import argparse
import signal
import threading
from typing import Any


def serve_ray(args: argparse.Namespace, settings: dict[str, Any]) -> int:
    import ray
    from ray import serve

    from .ray_serve import APP_NAME, build_app

    local = args.address is None
    ray.init(address=args.address, include_dashboard=False if local else None)
    serve.start(http_options={"host": args.host, "port": args.port})
    build_args: dict[str, Any] = {
        "engines": args.engines,
        "settings": {k: [str(i) for i in v] if isinstance(v, list) else str(v) for k, v in settings.items()},
        "num_gpus": args.gpus_per_engine,
        "ingress_min_replicas": args.ingress_replicas,
        "ingress_max_replicas": max(args.ingress_replicas, args.ingress_max_replicas or 0),
    }
    if args.placement:  # "digits;sd15,sdxl": one group per engine slot
        build_args["placement"] = [[m for m in g.split(",") if m] for g in args.placement.split(";")]
    serve.run(build_app(build_args), name=APP_NAME, route_prefix="/")
    print(f"kdiff on Ray Serve: http://{args.host}:{args.port}/ ({args.engines} engine slot(s))", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    serve.delete(APP_NAME)  # engine replicas drain (their __del__ runs the service's shutdown)
    if local:
        serve.shutdown()
        ray.shutdown()
    return 0
