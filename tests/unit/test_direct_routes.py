"""`DirectRoutes`: which requests it serves itself and which it hands to the app behind it."""

import asyncio

import httpx
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from proxy.direct_routes import DirectRoutes


async def _direct(request: Request) -> Response:
    return PlainTextResponse(f"direct {request.scope['path']} app={request.app.name}")


async def _by_id(request: Request) -> Response:
    return PlainTextResponse("direct with a parameter")


class _Behind:
    """The app behind: answers `behind` and says which request it got."""

    name = "behind"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await PlainTextResponse(f"behind {scope['method']} {scope['path']}")(scope, receive, send)


def _get(method: str, path: str) -> str:
    routes = [
        Route("/v1/chat/completions", _direct, methods=["POST"]),
        Route("/v1/responses/{response_id}/cancel", _by_id, methods=["POST"]),
        Route("/v1/models", _direct, methods=["GET"]),
    ]
    app = DirectRoutes(_Behind(), routes)

    async def call() -> str:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://capgate") as client:
            return (await client.request(method, path, content=b"{}")).text

    return asyncio.run(call())


def test_a_post_to_a_generation_path_is_served_directly_with_the_app_behind_as_request_app() -> None:
    assert _get("POST", "/v1/chat/completions") == "direct /v1/chat/completions app=behind"


def test_other_methods_paths_and_parameter_routes_go_to_the_app_behind() -> None:
    assert _get("GET", "/v1/chat/completions") == "behind GET /v1/chat/completions"
    assert _get("POST", "/v1/chat/completions/") == "behind POST /v1/chat/completions/"
    assert _get("POST", "/v1/responses/resp_1/cancel") == "behind POST /v1/responses/resp_1/cancel"
    assert _get("GET", "/v1/models") == "behind GET /v1/models"
    assert _get("POST", "/v1/chät/completions") == "behind POST /v1/chät/completions"
