"""The Anthropic Messages API through capgate, with the official `anthropic` SDK, against the
real vLLM and Redis: answers equal vLLM's own, billing equals vLLM's usage and counters, a hard
cap holds under concurrent streams of two replicas (mixed with chat completions), a hang-up is
billed within the stated bound, errors come in Anthropic's shape."""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import anthropic
import httpx
import openai
import pytest

from tests.harness import RedisServer, VllmServer, sample_sum
from tests.harness.capgate_server import CapgateServer
from tests.harness.capgate_server import replicas as two_replicas
from tests.harness.clients import openai_client
from tests.harness.ledger import generated, usage_left, wait_for_events
from tests.harness.policies import key_of, write_policy
from tests.harness.prom import parse

pytestmark = pytest.mark.integration

# Many requests at once on a 2-core machine that also runs vLLM: more than the production 0.5 s
# for a Redis call before it counts as an outage.
BURST = {"timeouts": {"redis_s": 5.0}}

RUN = uuid.uuid4().hex[:8]  # user ids unique to this run: Redis outlives a module
CAP = 3000
TIERS = {
    "metered": {"priority": 5, "prices": {"prompt": "0.20 USD/1M", "completion": "0.80 USD/1M"}},
    "capped": {"caps": {"windows": [{"per": "day", "tokens": CAP}]}},
}
EXACT, SAME, HANGUP, ROUND, ERRORS = (
    f"{name}-{RUN}" for name in ("exact", "same", "hangup", "round", "errors")
)
USERS = {EXACT: "metered", SAME: "metered", HANGUP: "metered", ROUND: "capped", ERRORS: "capped"}
# A content delta holds at most the 4 byte-tokens of one UTF-8 character: what vLLM generated for
# a hung-up messages stream is at most 4 times the deltas it showed (this covers, too, the few
# steps vLLM makes before it sees the abort).
TOKENS_PER_DELTA = 4


@pytest.fixture(scope="module")
def replicas(
    tmp_path_factory: pytest.TempPathFactory, vllm_server: VllmServer, redis_server: RedisServer
) -> Iterator[tuple[CapgateServer, CapgateServer]]:
    """Two capgate processes in front of the vLLM, sharing one Redis, as two replicas would."""
    workdir = tmp_path_factory.mktemp("messages")
    policy = write_policy(workdir / "policy.yaml", TIERS, USERS)
    with two_replicas(workdir, ("a", "b"), [vllm_server.base_url], redis_server.url, policy, BURST) as (a, b):
        yield a, b


def client(base_url: str, user: str) -> anthropic.Anthropic:
    """The official SDK as Anthropic clients run it (key in `x-api-key`), no retries."""
    return anthropic.Anthropic(base_url=base_url, api_key=key_of(user), max_retries=0, timeout=120)


def message(user: str) -> list[dict]:
    return [{"role": "user", "content": f"Tell {user} something {random.random()}"}]


def send(base_url: str, user: str, stream: bool, max_tokens: int) -> tuple[str, int, int, str | None]:
    """One messages request: (capgate's request id, input tokens, output tokens, stop reason)."""
    sdk = client(base_url, user)
    args = {"model": "tiny", "max_tokens": max_tokens, "messages": message(user)}
    if not stream:
        raw = sdk.messages.with_raw_response.create(**args)
        reply = raw.parse()
        usage = reply.usage
        prompt = usage.input_tokens + (usage.cache_read_input_tokens or 0)
        return raw.headers["x-request-id"], prompt, usage.output_tokens, reply.stop_reason
    with sdk.messages.with_streaming_response.create(**args, stream=True) as raw:
        request_id = raw.headers["x-request-id"]
        prompt = output = 0
        stop = None
        for event in raw.parse():
            if event.type == "message_start":
                prompt = event.message.usage.input_tokens + (event.message.usage.cache_read_input_tokens or 0)
            elif event.type == "message_delta":
                output, stop = event.usage.output_tokens, event.delta.stop_reason
        return request_id, prompt, output, stop


def test_answers_equal_vllms_own(
    replicas: tuple[CapgateServer, CapgateServer], vllm_server: VllmServer
) -> None:
    """Greedy answers through capgate and straight from vLLM: the same content, usage and stop
    reason, plain and streamed (through the SDK's stream helper)."""
    args = {
        "model": "tiny",
        "max_tokens": 24,
        "messages": [{"role": "user", "content": "Hi"}],
        "extra_body": {"temperature": 0},  # this SDK version has no `temperature` argument
    }
    ours, theirs = client(replicas[0].base_url, SAME), client(vllm_server.base_url, "unused")
    mine, direct = ours.messages.create(**args), theirs.messages.create(**args)
    assert mine.content == direct.content and mine.usage == direct.usage
    assert mine.stop_reason == direct.stop_reason == "max_tokens"
    with ours.messages.stream(**args) as a, theirs.messages.stream(**args) as b:
        assert list(a.text_stream) == list(b.text_stream)
        final_a, final_b = a.get_final_message(), b.get_final_message()
    assert (
        final_a.content == final_b.content
        and final_a.usage.output_tokens == final_b.usage.output_tokens == 24
    )


def test_billing_is_exact_plain_and_streamed(
    replicas: tuple[CapgateServer, CapgateServer], vllm_server: VllmServer
) -> None:
    vllm_server.wait_quiet()
    before = generated(vllm_server)
    rng = random.Random(11)
    jobs = [(replicas[i % 2].base_url, rng.random() < 0.5, rng.randint(1, 40)) for i in range(40)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda j: send(j[0], EXACT, j[1], j[2]), jobs))
    events = {e["request_id"]: e for e in wait_for_events(replicas[0], EXACT, len(jobs))}
    assert len(events) == len(jobs)
    for request_id, prompt, output, _ in results:
        assert (int(events[request_id]["prompt_tokens"]), int(events[request_id]["completion_tokens"])) == (
            prompt,
            output,
        )
    vllm_server.wait_quiet()
    after = generated(vllm_server)
    assert sum(int(e["completion_tokens"]) for e in events.values()) == after[0] - before[0]
    assert sum(int(e["prompt_tokens"]) for e in events.values()) == after[1] - before[1]
    assert all(int(e["value_nano"]) > 0 for e in events.values())
    counted = sum(
        sample_sum(
            parse(httpx.get(f"{r.base_url}/metrics").text), "capgate_requests_total", {"route": "messages"}
        )
        for r in replicas
    )
    assert counted >= len(jobs), "requests carry their route in the metrics"


def test_no_overshoot_with_concurrent_messages_and_chat_streams_over_two_replicas(
    replicas: tuple[CapgateServer, CapgateServer], vllm_server: VllmServer
) -> None:
    """60 streams of one user at once, two thirds messages and a third chat completions, spread
    over both replicas, each asking more than a tenth of the cap: billed never over the cap,
    and equal to what vLLM generated."""
    vllm_server.wait_quiet()
    before = generated(vllm_server)[0]
    rng = random.Random(ROUND)
    asks = [rng.randint(CAP // 10 + 1, CAP // 4) for _ in range(60)]
    barrier = threading.Barrier(60)

    def one(i: int) -> tuple[int, str]:
        base = replicas[i % 2].base_url
        barrier.wait()
        try:
            if i % 3:
                send(base, ROUND, True, asks[i])
            else:
                chunks = openai_client(base, key_of(ROUND)).chat.completions.create(
                    model="tiny", messages=message(ROUND), max_tokens=asks[i], stream=True
                )
                for _ in chunks:
                    pass
            return 200, ""
        except anthropic.APIStatusError as exc:
            return exc.status_code, exc.body["error"]["type"]
        except openai.APIStatusError as exc:
            return exc.status_code, exc.body.get("code", "")

    with ThreadPoolExecutor(60) as pool:
        outcomes = list(pool.map(one, range(60)))
    served = sum(status == 200 for status, _ in outcomes)
    refused = {(status, kind) for status, kind in outcomes if status != 200}
    assert served and refused <= {(429, "rate_limit_error"), (429, "cap_exceeded")}, refused
    events = wait_for_events(replicas[0], ROUND, served)
    assert len(events) == served
    vllm_server.wait_quiet()
    completion = sum(int(e["completion_tokens"]) for e in events)
    billed = completion + sum(int(e["prompt_tokens"]) for e in events)
    made = generated(vllm_server)[0] - before
    print(f"\n{served} of 60 streams served, billed {billed} of {CAP}, vLLM generated {made}")
    assert billed <= CAP
    assert completion == made
    assert usage_left(replicas[1], ROUND)["day"] == CAP - billed


def test_hang_up_is_billed_the_deltas_seen_within_the_bound(
    replicas: tuple[CapgateServer, CapgateServer], vllm_server: VllmServer
) -> None:
    """vLLM's messages stream has no running usage: a hang-up is billed the content deltas
    capgate relayed and drained, never more than vLLM generated, and at least a quarter of it."""
    vllm_server.wait_quiet()
    before = generated(vllm_server)[0]
    body = {"model": "tiny", "max_tokens": 4000, "stream": True, "messages": message(HANGUP)}
    headers = {"x-api-key": key_of(HANGUP), "anthropic-version": "2023-06-01"}
    with httpx.stream(
        "POST", f"{replicas[0].base_url}/v1/messages", json=body, headers=headers, timeout=60
    ) as r:
        assert r.status_code == 200
        deltas = 0
        for line in r.iter_lines():
            deltas += line == "event: content_block_delta"
            if deltas == 30:
                break
    deadline = time.monotonic() + 30
    while sample_sum(vllm_server.metrics(), "vllm:num_requests_running") > 0:
        assert time.monotonic() < deadline, "vLLM still runs the abandoned stream"
        time.sleep(0.05)
    [event] = wait_for_events(replicas[0], HANGUP, 1)
    vllm_server.wait_quiet()
    made = generated(vllm_server)[0] - before
    billed = int(event["completion_tokens"])
    print(f"\nhung up after 30 deltas: billed {billed}, vLLM generated {made}")
    assert event["finish_reason"] == "client_disconnected"
    assert 30 <= billed <= made <= TOKENS_PER_DELTA * billed


def test_errors_are_anthropic_shaped_and_name_the_parameter(
    replicas: tuple[CapgateServer, CapgateServer],
) -> None:
    base = replicas[0].base_url
    sdk = client(base, ERRORS)
    with pytest.raises(anthropic.BadRequestError) as bad:
        sdk.messages.create(model="tiny", max_tokens=-5, messages=message(ERRORS))
    assert bad.value.body["type"] == "error" and bad.value.body["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in bad.value.body["error"]["message"]
    image = {"type": "image", "source": {"type": "url", "url": "http://127.0.0.1/x.png"}}
    with pytest.raises(anthropic.BadRequestError) as media:
        sdk.messages.create(model="tiny", max_tokens=5, messages=[{"role": "user", "content": [image]}])
    assert "messages[0].content[0]" in media.value.body["error"]["message"]
    picture = {"type": "image_url", "image_url": {"url": "http://127.0.0.1/x.png"}}
    with pytest.raises(openai.BadRequestError) as chat_media:
        openai_client(base, key_of(ERRORS)).chat.completions.create(
            model="tiny", max_tokens=5, messages=[{"role": "user", "content": [picture]}]
        )
    assert chat_media.value.body["param"] == "messages[0].content[0]"
    assert chat_media.value.body["code"] == "unsupported_content"
    with pytest.raises(anthropic.AuthenticationError) as auth:
        anthropic.Anthropic(base_url=base, api_key="sk-wrong", max_retries=0).messages.create(
            model="tiny", max_tokens=5, messages=message(ERRORS)
        )
    assert auth.value.body["error"]["type"] == "authentication_error"
    with pytest.raises(anthropic.NotFoundError):
        sdk.messages.create(model="no-such-model", max_tokens=5, messages=message(ERRORS))
    reply = httpx.post(
        f"{base}/v1/messages",
        content=b'{"model": "tiny", "max_tokens": 5, "messages": [',
        headers={"authorization": f"Bearer {key_of(ERRORS)}"},
    )
    assert reply.status_code == 400 and reply.json()["type"] == "error"
    assert usage_left(replicas[0], ERRORS)["day"] == CAP, "no refused request changed the budget"


def test_count_tokens_is_vllms_and_needs_a_key(
    replicas: tuple[CapgateServer, CapgateServer], vllm_server: VllmServer
) -> None:
    messages = [{"role": "user", "content": "How many tokens is this?"}]
    ours = client(replicas[0].base_url, ERRORS).messages.count_tokens(model="tiny", messages=messages)
    theirs = client(vllm_server.base_url, "unused").messages.count_tokens(model="tiny", messages=messages)
    assert ours.input_tokens == theirs.input_tokens > 0
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(
            base_url=replicas[0].base_url, api_key="sk-wrong", max_retries=0
        ).messages.count_tokens(model="tiny", messages=messages)
    assert usage_left(replicas[0], ERRORS)["day"] == CAP
