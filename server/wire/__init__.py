"""The wire format: the JSON shapes of the HTTP API and the live frames (pydantic models),
and the views that render domain objects into them. Imports domain only."""
