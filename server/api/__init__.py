"""The HTTP API: the app factory and its lifespan, routes per area, errors to responses,
middleware. The top layer: it may import every other (docs/architecture.md)."""
