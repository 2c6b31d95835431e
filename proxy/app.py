"""The ASGI application: routes, and the lifespan that owns every shared client and task."""

import contextlib
import logging
from collections.abc import AsyncIterator

import httpx
from fastapi import FastAPI
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp

from metering import pipeline
from metering.accounts import AccountStore
from metering.meter import Meter, MeterUnavailable, RedisClient
from metering.pipeline import ScriptConnection
from metering.settler import Settler
from metering.spool import Spool
from metering.usage import user_usage
from proxy import background, metrics
from proxy.admin.api_router import admin_routes
from proxy.admin.serving import AccountService
from proxy.admission import Admission
from proxy.anthropic.api_router import anthropic_routes
from proxy.direct_routes import DirectRoutes
from proxy.directory import Directory
from proxy.errors import APIError, route_error
from proxy.gateway import Gateway
from proxy.openai.api_router import openai_routes
from proxy.policy_store import PolicyStore
from proxy.responses.api_router import responses_routes
from proxy.settings import Settings, load_settings
from proxy.transport import Http1Transport
from proxy.upstream import UpstreamPool

log = logging.getLogger("capgate")
HEARTBEAT_S = 1.0  # how often the script connection is pinged, to find a dead one before a request does


def redis_client(settings: Settings) -> RedisClient:
    """The Redis (or Redis Cluster) client for metering."""
    timeout = settings.timeouts.redis_s
    options = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
    if settings.redis_cluster:
        return RedisCluster.from_url(
            settings.redis_url, max_connections=settings.redis_max_connections, **options
        )
    pool = BlockingConnectionPool.from_url(
        settings.redis_url, max_connections=settings.redis_max_connections, timeout=timeout, **options
    )
    return Redis(connection_pool=pool)


def script_connection(settings: Settings) -> ScriptConnection | None:
    """The pipelined connection for the meter's scripts: on a single Redis reached by a
    `redis://` or `unix://` URL (a cluster or TLS runs them through `redis_client`)."""
    if settings.redis_cluster or not pipeline.supports(settings.redis_url):
        return None
    return ScriptConnection(settings.redis_url, settings.timeouts.redis_s, settings.redis_max_in_flight)


async def _sync_accounts(directory: Directory) -> None:
    """Read the accounts' changes (a Redis outage is logged by the requests it fails)."""
    try:
        await directory.sync()
    except MeterUnavailable as exc:
        metrics.REDIS_ERRORS.labels(operation="account_sync").inc()
        log.debug("account changes not read: redis unavailable (%s)", exc)


async def _housekeeping(gateway: Gateway) -> None:
    """Reap expired reservations and replay the spool."""
    try:
        await gateway.meter.reap_all()
        await gateway.settler.replay()
    except MeterUnavailable as exc:
        log.debug("housekeeping skipped: redis unavailable (%s)", exc)
    finally:
        metrics.SPOOL_BYTES.set(gateway.settler.spool.size())


def create_app(settings: Settings) -> ASGIApp:
    """The gateway app for `settings`; clients and background tasks live in its lifespan. The
    generation routes are served in front of the framework (`proxy.direct_routes`)."""
    policies = PolicyStore(settings.policy_file, settings.policy_poll_s)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        timeouts = settings.timeouts
        transport = Http1Transport()
        client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeouts.read_s, connect=timeouts.connect_s), transport=transport
        )
        redis = redis_client(settings)
        scripts = script_connection(settings)
        pool = UpstreamPool(settings, client, transport)
        meter = Meter(redis, lease_ttl_s=settings.lease_ttl_s, scripts=scripts)
        settler = Settler(meter, Spool(settings.spool_dir, settings.spool_max_bytes))
        admission = Admission(settings.admission, pool, meter)
        store = AccountStore(redis)
        directory = Directory(store, lambda: policies.index, settings.accounts)
        gateway = Gateway(settings, policies, pool, meter, settler, admission, directory)
        app.state.gateway = gateway
        app.state.accounts = AccountService(store, meter, lambda: policies.index)
        await pool.start()
        await _sync_accounts(directory)
        admission.start()
        policies.start()
        loops = [
            background.start("housekeeping", settings.reap_interval_s, lambda: _housekeeping(gateway)),
            background.start("lease_refresh", settings.lease_ttl_s / 3, gateway.refresh),
            background.start("preemptions", settings.admission.release_interval_s, gateway.end_preempted),
            background.start("redis_heartbeat", HEARTBEAT_S, meter.heartbeat),
            background.start(
                "account_sync", settings.accounts.sync_interval_s, lambda: _sync_accounts(directory)
            ),
            background.start(
                "key_last_used", settings.accounts.last_used_interval_s, directory.flush_last_used
            ),
        ]
        try:
            yield
        finally:
            for loop in loops:
                await background.stop(loop)
            await gateway.shutdown()
            await policies.stop()
            await admission.stop()
            await pool.stop()
            await client.aclose()
            if scripts is not None:
                await scripts.aclose()
            await redis.aclose()

    app = FastAPI(title="capgate", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> Response:
        return error.response()

    @app.exception_handler(HTTPException)
    async def no_route(request: Request, error: HTTPException) -> Response:
        return route_error(request.method, request.url.path, error.status_code, error.headers).response()

    def gateway_of(request: Request) -> Gateway:
        return request.app.state.gateway

    generation = [
        *openai_routes(gateway_of),
        *anthropic_routes(gateway_of),
        *responses_routes(gateway_of),
    ]
    app.router.routes.extend(generation)
    app.router.routes.extend(admin_routes(gateway_of, lambda request: request.app.state.accounts))

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        """The models of every healthy upstream the caller's tier may use, with vLLM's cards
        (as last polled)."""
        gateway = gateway_of(request)
        principal = await gateway.principal(request)
        cards = [card for card in gateway.pool.model_cards() if principal.tier.allows_model(card["id"])]
        return JSONResponse({"object": "list", "data": cards})

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(request: Request) -> Response:
        gateway = gateway_of(request)
        reasons = []
        try:
            await gateway.meter.ping()
        except MeterUnavailable as exc:
            reasons.append(f"redis unreachable: {exc}")
        healthy = 0
        for state in gateway.pool.states:
            try:
                reply = await gateway.pool.client.get(f"{state.upstream.url}/health", timeout=2.0)
                healthy += reply.status_code == 200
                if reply.status_code != 200:
                    reasons.append(f"upstream {state.upstream.label} health {reply.status_code}")
            except httpx.HTTPError as exc:
                reasons.append(f"upstream {state.upstream.label} unreachable: {exc!r}")
        if healthy == 0 or any(r.startswith("redis") for r in reasons):
            return JSONResponse({"status": "unavailable", "reasons": reasons}, status_code=503)
        return JSONResponse({"status": "ready", "reasons": reasons})

    @app.get("/metrics")
    async def metrics_page() -> Response:
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    @app.get("/v1/usage")
    async def own_usage(request: Request) -> dict:
        gateway = gateway_of(request)
        principal = await gateway.principal(request)
        policy = gateway.policies.index.policy
        return await user_usage(gateway.meter.redis, principal, policy.currency)

    return DirectRoutes(app, generation)


def app_from_environment() -> ASGIApp:
    """The app for `uvicorn --factory`: settings from `$CAPGATE_CONFIG` and the environment."""
    return create_app(load_settings())
