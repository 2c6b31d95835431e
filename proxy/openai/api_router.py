"""The OpenAI generation routes. They are plain Starlette routes: FastAPI's dependency and
response handling per request buys nothing for a handler that reads the raw request and returns
its own response."""

from collections.abc import Callable

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from proxy.gateway import Gateway

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


def openai_routes(gateway_of: Callable[[Request], Gateway]) -> list[Route]:
    """`POST /v1/chat/completions` and `POST /v1/completions`, served by the request's gateway."""

    async def chat(request: Request) -> Response:
        return await gateway_of(request).handle(request, "chat")

    async def completions(request: Request) -> Response:
        return await gateway_of(request).handle(request, "completions")

    return [Route(CHAT, chat, methods=["POST"]), Route(COMPLETIONS, completions, methods=["POST"])]
