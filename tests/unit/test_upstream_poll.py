"""The upstream poll: a slow or dropped poll does not take a serving upstream out at once; a
refused connection or a garbage answer does."""

import asyncio
from collections.abc import Callable

import httpx
import pytest

from proxy.settings import load_settings
from proxy.upstream import SLOW_POLLS_TO_EJECT, UpstreamPool

MODELS = {"object": "list", "data": [{"id": "tiny", "max_model_len": 1024}]}


def polled(fail: Callable[[], Exception | None]) -> UpstreamPool:
    """A pool of one upstream whose answers are `fail()` when it returns an error, else good."""

    def answer(request: httpx.Request) -> httpx.Response:
        error = fail()
        if error is not None:
            raise error
        if request.url.path == "/v1/models":
            return httpx.Response(200, json=MODELS)
        return httpx.Response(200, text="vllm:num_requests_running 0\n")

    settings = load_settings(env={"CAPGATE_UPSTREAMS": "http://a:8000"})
    transport = httpx.MockTransport(answer)
    return UpstreamPool(settings, httpx.AsyncClient(transport=transport), transport)


@pytest.mark.parametrize(
    "error",
    [httpx.ReadTimeout("slow"), httpx.RemoteProtocolError("closed without a response"), httpx.ReadError("x")],
    ids=["timeout", "closed", "read-error"],
)
def test_a_serving_upstream_slow_to_answer_polls_stays_in_until_several_in_a_row_failed(
    error: Exception,
) -> None:
    failing = [False]
    pool = polled(lambda: error if failing[0] else None)
    state = pool.states[0]
    asyncio.run(pool.refresh(state))
    assert state.healthy and pool.models() == {"tiny": 1024}
    failing[0] = True
    for _ in range(SLOW_POLLS_TO_EJECT - 1):
        asyncio.run(pool.refresh(state))
        assert state.healthy
    failing[0] = False
    asyncio.run(pool.refresh(state))  # one good poll starts the count again
    failing[0] = True
    for _ in range(SLOW_POLLS_TO_EJECT - 1):
        asyncio.run(pool.refresh(state))
    assert state.healthy
    asyncio.run(pool.refresh(state))
    assert not state.healthy and pool.models() == {}


def test_a_refused_connection_takes_the_upstream_out_at_once() -> None:
    failing = [False]
    pool = polled(lambda: httpx.ConnectError("refused") if failing[0] else None)
    state = pool.states[0]
    asyncio.run(pool.refresh(state))
    assert state.healthy
    failing[0] = True
    asyncio.run(pool.refresh(state))
    assert not state.healthy
