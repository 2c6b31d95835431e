"""The OpenAI generation routes. They are plain Starlette routes: FastAPI's dependency and
response handling per request buys nothing for a handler that reads the raw request and returns
its own response."""

import functools
from collections.abc import Callable

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from proxy.dialect import Dialect
from proxy.errors import APIError
from proxy.gateway import Gateway
from proxy.openai.protocol import OpenAIApi, parse_embeddings, parse_request
from proxy.openai.serving import (
    embeddings_prompt_bound,
    local_prompt_bound,
    serve,
    serve_embeddings,
    tokenized_prompt_bound,
)

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
EMBEDDINGS = "/v1/embeddings"

EMBEDDINGS_DIALECT = Dialect(
    "embeddings",
    parse_embeddings,
    APIError.response,
    embeddings_prompt_bound,
    tokenized_prompt_bound,
    serve_embeddings,
    leases=False,
    generates=False,
)


def dialect(api: OpenAIApi) -> Dialect:
    """The OpenAI API's `chat` or `completions` dialect."""
    return Dialect(
        api,
        functools.partial(parse_request, api),
        APIError.response,
        local_prompt_bound,
        tokenized_prompt_bound,
        serve,
    )


def openai_routes(gateway_of: Callable[[Request], Gateway]) -> list[Route]:
    """`POST /v1/chat/completions`, `POST /v1/completions` and `POST /v1/embeddings`, served by
    the request's gateway."""
    chat_dialect, completions_dialect = dialect("chat"), dialect("completions")

    async def chat(request: Request) -> Response:
        return await gateway_of(request).handle(request, chat_dialect)

    async def completions(request: Request) -> Response:
        return await gateway_of(request).handle(request, completions_dialect)

    async def embeddings(request: Request) -> Response:
        return await gateway_of(request).handle(request, EMBEDDINGS_DIALECT)

    return [
        Route(CHAT, chat, methods=["POST"]),
        Route(COMPLETIONS, completions, methods=["POST"]),
        Route(EMBEDDINGS, embeddings, methods=["POST"]),
    ]
