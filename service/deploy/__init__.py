"""Scale-out deployments: the Ray Serve application (ray_serve.py), needing the `ray` extra."""
