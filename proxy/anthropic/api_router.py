"""The Anthropic Messages routes: `POST /v1/messages` (metered like every generation route) and
`POST /v1/messages/count_tokens` (authenticated, not metered: vLLM only counts). The key may come
as `x-api-key`, as Anthropic's clients send it, or as `Authorization: Bearer`."""

from collections.abc import Callable

import httpx
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from proxy.anthropic.protocol import error_response, parse_count_request, parse_request
from proxy.anthropic.serving import COUNT_TOKENS, local_prompt_bound, serve, tokenized_prompt_bound
from proxy.dialect import Dialect
from proxy.errors import APIError
from proxy.gateway import Gateway
from proxy.inbound import read_body

MESSAGES = "/v1/messages"
KEY_HEADER = "x-api-key"
LOOKUP_TIMEOUT_S = 10.0  # vLLM renders and counts a prompt; it generates nothing

DIALECT = Dialect(
    "messages",
    parse_request,
    error_response,
    local_prompt_bound,
    tokenized_prompt_bound,
    serve,
    leases=False,
    key_header=KEY_HEADER,
)


async def count_tokens(gateway: Gateway, request: Request) -> Response:
    """vLLM's count of the prompt tokens of a messages request, for a caller whose tier may use
    the model; nothing is reserved or billed."""
    principal = await gateway.principal(request, KEY_HEADER)
    raw = await read_body(request, gateway.settings.max_body_bytes)
    model = parse_count_request(raw)
    gateway.served_model(principal, model)
    upstream = gateway.pool.pick(model)
    if upstream is None:
        raise APIError(502, "no healthy upstream serves this model", type="upstream_error")
    try:
        reply = await gateway.pool.client.post(
            upstream.upstream.url + COUNT_TOKENS,
            content=raw,
            headers={"content-type": "application/json"},
            timeout=LOOKUP_TIMEOUT_S,
        )
    except httpx.HTTPError as exc:
        raise APIError(502, f"upstream unreachable: {exc}", type="upstream_error") from exc
    return Response(reply.content, reply.status_code, media_type=reply.headers.get("content-type"))


def anthropic_routes(gateway_of: Callable[[Request], Gateway]) -> list[Route]:
    """`POST /v1/messages` and `POST /v1/messages/count_tokens`, served by the request's gateway."""

    async def messages(request: Request) -> Response:
        return await gateway_of(request).handle(request, DIALECT)

    async def count(request: Request) -> Response:
        try:
            return await count_tokens(gateway_of(request), request)
        except APIError as error:
            return error_response(error)

    return [Route(MESSAGES, messages, methods=["POST"]), Route(COUNT_TOKENS, count, methods=["POST"])]
