"""What capgate answers itself about its routes: the model list merged over the upstreams, and
OpenAI-shaped errors for a path or method no route serves."""

import json

import httpx
import pytest

from proxy.errors import route_error
from proxy.settings import load_settings
from proxy.upstream import UpstreamPool


def _card(model: str, upstream: str, context: int) -> dict:
    return {"id": model, "object": "model", "owned_by": "vllm", "root": upstream, "max_model_len": context}


@pytest.fixture
def pool() -> UpstreamPool:
    settings = load_settings(env={"CAPGATE_UPSTREAMS": "http://a:8000, http://b:8000, http://c:8000"})
    transport = httpx.AsyncHTTPTransport()
    return UpstreamPool(settings, httpx.AsyncClient(transport=transport), transport)


def test_model_cards_are_merged_over_the_healthy_upstreams_each_id_once(pool: UpstreamPool) -> None:
    a, b, c = pool.states
    a.cards = {"tiny": _card("tiny", "a", 1024)}
    b.cards = {"tiny": _card("tiny", "b", 2048), "small": _card("small", "b", 4096)}
    c.cards = {"dead": _card("dead", "c", 512)}
    a.healthy = b.healthy = True
    cards = pool.model_cards()
    assert [card["id"] for card in cards] == ["tiny", "small"], (
        "an unhealthy upstream's models are not listed"
    )
    assert cards[0]["root"] == "a", "a model served twice is listed from the first upstream"
    a.healthy = False
    assert [card["root"] for card in pool.model_cards()] == ["b", "b"]


def test_model_cards_are_empty_with_no_healthy_upstream(pool: UpstreamPool) -> None:
    pool.states[0].cards = {"tiny": _card("tiny", "a", 1024)}
    assert pool.model_cards() == []


@pytest.mark.parametrize(
    ("status", "code", "start"),
    [(404, "unknown_url", "Invalid URL (POST "), (405, "method_not_allowed", "Method not allowed (POST ")],
)
def test_route_errors_are_openai_shaped(status: int, code: str, start: str) -> None:
    error = route_error("POST", "/v1/nowhere", status, {"Allow": "GET"} if status == 405 else None)
    response = error.response()
    body = json.loads(response.body)
    assert response.status_code == status
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == code and body["error"]["message"].startswith(start)
    assert body["error"]["type"] == "invalid_request_error"
    assert (response.headers.get("allow") == "GET") == (status == 405)


def test_a_huge_or_odd_path_is_shortened_and_stays_valid_json() -> None:
    path = "/v1/" + "\u202e\U0001f600" * 10_000
    body = json.loads(route_error("GET", path, 404).response().body)
    message = body["error"]["message"]
    assert len(message) < 300 and message.endswith("...)")
