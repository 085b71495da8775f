"""Live updates over `/ws`: the hub of this process's sockets, its uvicorn protocol, the
Redis subscriber, and the frames with their publisher. Imports service and below."""
