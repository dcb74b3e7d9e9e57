"""The HTTP API: app factory, routes, schemas, settings, image encoding."""
