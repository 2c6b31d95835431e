"""The generation routes served straight from the ASGI scope, in front of the framework.

Every request passes through the framework's middleware and router (error middlewares, the
exception handlers, routing by pattern), and a streamed response passes each of its events back
out through as many `send` wrappers. The generation routes need none of it: they read the raw
request, answer every error in their API's own shape and return a response that sends itself. So
`DirectRoutes` looks up a `POST` to one of their exact paths in a dict and calls the endpoint
itself; everything else (other methods, other paths, the lifespan) goes to the app behind it,
unchanged. An exception escaping an endpoint reaches the server, which logs it and answers 500, as
the framework's error middleware would.
"""

from collections.abc import Iterable

from starlette.requests import Request
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send


class DirectRoutes:
    """An ASGI app serving the `POST` routes of `routes` whose path has no parameter, and passing
    every other request to `app` (whose state a direct request sees as `request.app`)."""

    def __init__(self, app: ASGIApp, routes: Iterable[Route]) -> None:
        self.app = app
        self.endpoints = {
            route.path: route.endpoint
            for route in routes
            if route.methods == {"POST"} and not route.param_convertors
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            endpoint = self.endpoints.get(scope["path"])
            if endpoint is not None:
                scope["app"] = self.app
                response = await endpoint(Request(scope, receive))
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
