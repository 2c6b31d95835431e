"""The admin routes (an admin key of the policy file only): accounts (users, their API keys,
teams), a user's usage, the tiers' totals and the ledger export. JSON in and out, OpenAI-shaped
errors."""

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from metering.usage import export_lines, tier_totals, user_usage
from proxy.admin.protocol import (
    CreateKey,
    CreateTeam,
    CreateUser,
    UpdateTeam,
    UpdateUser,
    check_id,
    parse_body,
)
from proxy.admin.serving import AccountService, answered
from proxy.errors import APIError, unauthorized
from proxy.gateway import Gateway
from proxy.inbound import bearer_key, read_body

MAX_ADMIN_BODY = 64 << 10
Handler = Callable[[Request, AccountService], Awaitable[Any]]


EPOCH_MS_DIGITS = 15  # a time in ms since 1970 (13 digits now), with room to spare


def _int_query(request: Request, name: str, default: int, digits: int = 9) -> int:
    """A whole number of at most `digits` ASCII digits from the query, else a 400 naming it."""
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit()) or len(raw) > digits:
        raise APIError(400, f"'{name}' must be a whole number", param=name, code="invalid_value")
    return int(raw)


async def _body(request: Request) -> bytes:
    return await read_body(request, MAX_ADMIN_BODY)


async def _after(first: str, rest: AsyncIterator[str]) -> AsyncIterator[str]:
    yield first
    async for line in rest:
        yield line


def admin_routes(
    gateway_of: Callable[[Request], Gateway], accounts_of: Callable[[Request], AccountService]
) -> list[Route]:
    """Every `/admin/...` route."""

    def admin(request: Request) -> Gateway:
        gateway = gateway_of(request)
        if not gateway.policies.index.is_admin_key(bearer_key(request)):
            raise unauthorized("this endpoint needs an admin key")
        return gateway

    def route(path: str, method: str, handler: Handler, status: int = 200) -> Route:
        async def endpoint(request: Request) -> Response:
            admin(request)
            answer = await answered(handler(request, accounts_of(request)))
            return JSONResponse(answer, status_code=status)

        return Route(path, endpoint, methods=[method])

    def path(request: Request, name: str) -> str:
        return request.path_params[name]

    async def create_user(request: Request, accounts: AccountService) -> Any:
        return await accounts.create_user(parse_body(CreateUser, await _body(request)))

    async def update_user(request: Request, accounts: AccountService) -> Any:
        return await accounts.update_user(
            path(request, "user_id"), parse_body(UpdateUser, await _body(request))
        )

    async def create_key(request: Request, accounts: AccountService) -> Any:
        return await accounts.create_key(
            path(request, "user_id"), parse_body(CreateKey, await _body(request))
        )

    async def create_team(request: Request, accounts: AccountService) -> Any:
        return await accounts.create_team(parse_body(CreateTeam, await _body(request)))

    async def update_team(request: Request, accounts: AccountService) -> Any:
        return await accounts.update_team(
            path(request, "team_id"), parse_body(UpdateTeam, await _body(request))
        )

    async def list_users(request: Request, accounts: AccountService) -> Any:
        after = request.query_params.get("after")
        return await accounts.list_users(after, _int_query(request, "limit", 100))

    async def list_teams(request: Request, accounts: AccountService) -> Any:
        after = request.query_params.get("after")
        return await accounts.list_teams(after, _int_query(request, "limit", 100))

    async def usage(request: Request) -> Response:
        gateway = admin(request)
        user_id = check_id(path(request, "user_id"), "user")
        principal = await answered(gateway.directory.principal_for_user(user_id))
        if principal is None:
            raise APIError(404, f"no user {user_id!r}", code="user_not_found")
        policy = gateway.policies.index.policy
        return JSONResponse(await answered(user_usage(gateway.meter.redis, principal, policy.currency)))

    async def tiers(request: Request) -> Response:
        gateway = admin(request)
        totals = await tier_totals(gateway.meter.redis)
        return JSONResponse({"currency": gateway.policies.index.policy.currency, "tiers": totals})

    async def ledger(request: Request) -> Response:
        gateway = admin(request)
        fmt = request.query_params.get("format", "jsonl")
        if fmt not in ("jsonl", "csv"):
            raise APIError(400, "format must be 'jsonl' or 'csv'", param="format")
        since = _int_query(request, "since_ms", 0, EPOCH_MS_DIGITS)
        until = _int_query(request, "until_ms", -1, EPOCH_MS_DIGITS)
        lines = export_lines(gateway.meter.redis, fmt, since, None if until < 0 else until)
        try:
            first = await anext(lines, "")  # Redis down: a 503 before any byte is sent
        except (RedisError, OSError) as exc:
            raise APIError(
                503, "the ledger is unavailable: Redis cannot be reached", type="service_unavailable",
                code="meter_unavailable", headers={"Retry-After": "1"},
            ) from exc  # fmt: skip
        media = "text/csv" if fmt == "csv" else "application/x-ndjson"
        return StreamingResponse(_after(first, lines), media_type=media)

    return [
        route("/admin/users", "POST", create_user, 201),
        route("/admin/users", "GET", list_users),
        route("/admin/users/{user_id}", "GET", lambda r, a: a.get_user(path(r, "user_id"))),
        route("/admin/users/{user_id}", "PATCH", update_user),
        route("/admin/users/{user_id}", "DELETE", lambda r, a: a.delete_user(path(r, "user_id"))),
        route("/admin/users/{user_id}/keys", "POST", create_key, 201),
        route("/admin/users/{user_id}/keys", "GET", lambda r, a: a.list_keys(path(r, "user_id"))),
        route("/admin/keys/{key_id}", "DELETE", lambda r, a: a.revoke_key(path(r, "key_id"))),
        route("/admin/teams", "POST", create_team, 201),
        route("/admin/teams", "GET", list_teams),
        route("/admin/teams/{team_id}", "GET", lambda r, a: a.get_team(path(r, "team_id"))),
        route("/admin/teams/{team_id}", "PATCH", update_team),
        route("/admin/teams/{team_id}", "DELETE", lambda r, a: a.delete_team(path(r, "team_id"))),
        Route("/admin/users/{user_id}/usage", usage, methods=["GET"]),
        Route("/admin/tiers", tiers, methods=["GET"]),
        Route("/admin/ledger", ledger, methods=["GET"]),
    ]
