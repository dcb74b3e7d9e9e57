"""The serving layer: what every front end (the HTTP API, its A1111 and OpenAI routes, ``kdiff sample``,
the Ray engine replicas) goes through to generate, and knows nothing of HTTP.

- ``request.py``: :class:`GenerationRequest`, THE list of request fields (type, bounds, doc), and
  ``build_job`` (a request on a loaded model -> the engine's JobRequest);
- ``pool.py``: :class:`ModelPool`, the store's models (manifests, loading, unloading, pins, eviction
  within the memory budget) and their typed :class:`ModelDefaults`;
- ``service.py``: :class:`Service`, jobs on the pool's engines (submit, cancel, previews, drain,
  finalize);
- ``errors.py``: :class:`ErrorCode`, the one list of error codes (front ends map them to statuses).

No fastapi, starlette or pydantic here (tests/test_layering.py).
"""
