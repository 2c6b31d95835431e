"""The Responses API routes: `POST /v1/responses` (metered like every generation route) and the
stored responses, which capgate gives to the user who created them only: `GET
/v1/responses/{id}`, `GET /v1/responses/{id}/input_items` and `POST /v1/responses/{id}/cancel`
are passed to the upstream that stores the response when the caller owns it, and are a 404 (as
for an id that does not exist) for anyone else."""

from collections.abc import Callable

import httpx
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from proxy.dialect import Dialect
from proxy.errors import APIError
from proxy.gateway import Gateway
from proxy.responses.protocol import RESPONSE_ID, parse_request
from proxy.responses.serving import local_prompt_bound, not_found, owned, prior, serve, tokenized_prompt_bound

RESPONSES = "/v1/responses"
LOOKUP_TIMEOUT_S = 30.0  # vLLM reads (or cancels) a stored response; it generates nothing

DIALECT = Dialect(
    "responses",
    parse_request,
    APIError.response,
    local_prompt_bound,
    tokenized_prompt_bound,
    serve,
    leases=False,
    prior=prior,
)


async def stored(gateway: Gateway, request: Request, method: str, tail: str) -> Response:
    """Pass a request about a stored response to the upstream holding it, for its owner."""
    principal = await gateway.principal(request)
    response_id = request.path_params["response_id"]
    if not RESPONSE_ID.fullmatch(response_id):
        raise not_found(response_id[:140])
    owner = await owned(gateway.meter, principal, response_id)
    url = f"{owner.upstream}{RESPONSES}/{response_id}{tail}"
    try:
        reply = await gateway.pool.client.request(
            method, url, params=request.query_params, timeout=LOOKUP_TIMEOUT_S
        )
    except httpx.HTTPError as exc:
        raise APIError(
            502, f"the upstream storing the response is unreachable: {exc}", type="upstream_error"
        ) from exc
    return Response(reply.content, reply.status_code, media_type=reply.headers.get("content-type"))


def responses_routes(gateway_of: Callable[[Request], Gateway]) -> list[Route]:
    """`POST /v1/responses` and the stored-response routes, served by the request's gateway."""

    async def create(request: Request) -> Response:
        return await gateway_of(request).handle(request, DIALECT)

    def passing(method: str, tail: str) -> Callable[[Request], object]:
        async def endpoint(request: Request) -> Response:
            try:
                return await stored(gateway_of(request), request, method, tail)
            except APIError as error:
                return error.response()

        return endpoint

    item = RESPONSES + "/{response_id}"
    return [
        Route(RESPONSES, create, methods=["POST"]),
        Route(item, passing("GET", ""), methods=["GET"]),
        Route(item + "/input_items", passing("GET", "/input_items"), methods=["GET"]),
        Route(item + "/cancel", passing("POST", "/cancel"), methods=["POST"]),
    ]
