"""The Responses API through capgate, with the official openai SDK, against the real vLLM (stored
responses on) and Redis: answers equal vLLM's own, billing equals vLLM's usage and counters,
stored responses belong to their creator, a continuation's prompt stays within its bound, a hard
cap holds under concurrent streams of every route over two replicas, a hang-up is billed within
the stated bound."""

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
NAMES = ("same", "exact", "owner", "other", "hangup", "round", "errors")
SAME, EXACT, OWNER, OTHER, HANGUP, ROUND, ERRORS = (f"{name}-{RUN}" for name in NAMES)
USERS = {SAME: "metered", EXACT: "metered", OWNER: "metered", OTHER: "metered", HANGUP: "metered"}
USERS |= {ROUND: "capped", ERRORS: "capped"}


@pytest.fixture(scope="module")
def replicas(
    tmp_path_factory: pytest.TempPathFactory, vllm_server: VllmServer, redis_server: RedisServer
) -> Iterator[tuple[CapgateServer, CapgateServer]]:
    """Two capgate processes in front of the vLLM, sharing one Redis, as two replicas would."""
    workdir = tmp_path_factory.mktemp("responses")
    policy = write_policy(workdir / "policy.yaml", TIERS, USERS)
    with two_replicas(workdir, ("a", "b"), [vllm_server.base_url], redis_server.url, policy, BURST) as (a, b):
        yield a, b


def text(user: str) -> str:
    return f"Tell {user} something {random.random()}"


def send(base_url: str, user: str, stream: bool, max_output_tokens: int) -> tuple[str, int, int]:
    """One responses request: (capgate's request id, input tokens, output tokens)."""
    sdk = openai_client(base_url, key_of(user))
    args = {"model": "tiny", "input": text(user), "max_output_tokens": max_output_tokens}
    if not stream:
        raw = sdk.responses.with_raw_response.create(**args)
        usage = raw.parse().usage
        return raw.headers["x-request-id"], usage.input_tokens, usage.output_tokens
    with sdk.responses.with_streaming_response.create(**args, stream=True) as raw:
        request_id = raw.headers["x-request-id"]
        final = None
        for event in raw.parse():
            if event.type in ("response.completed", "response.incomplete"):
                final = event.response
        assert final is not None and final.usage is not None
        return request_id, final.usage.input_tokens, final.usage.output_tokens


def test_answers_equal_vllms_own(
    replicas: tuple[CapgateServer, CapgateServer], vllm_server: VllmServer
) -> None:
    """Greedy answers through capgate and straight from vLLM: the same text and usage, plain and
    through the SDK's stream helper; a response stopped by its limit is incomplete, as vLLM says."""
    args = {"model": "tiny", "input": "Hi", "max_output_tokens": 20, "temperature": 0, "store": False}
    ours, theirs = (
        openai_client(replicas[0].base_url, key_of(SAME)),
        openai_client(vllm_server.base_url, "unused"),
    )
    mine, direct = ours.responses.create(**args), theirs.responses.create(**args)
    assert mine.output_text == direct.output_text
    assert (mine.usage.input_tokens, mine.usage.output_tokens) == (direct.usage.input_tokens, 20)
    assert mine.status == direct.status == "incomplete"
    assert mine.incomplete_details.reason == "max_output_tokens"
    with ours.responses.stream(**args) as a, theirs.responses.stream(**args) as b:
        deltas_a = [e.delta for e in a if e.type == "response.output_text.delta"]
        deltas_b = [e.delta for e in b if e.type == "response.output_text.delta"]
        final_a, final_b = a.get_final_response(), b.get_final_response()
    assert "".join(deltas_a) == "".join(deltas_b) == final_a.output_text == final_b.output_text
    assert final_a.usage.output_tokens == final_b.usage.output_tokens == 20
    [event] = [
        e for e in wait_for_events(replicas[0], SAME, 2) if e["request_id"] == mine.id.removeprefix("resp_")
    ]
    assert event["finish_reason"] == "max_output_tokens"


def test_billing_is_exact_plain_and_streamed(
    replicas: tuple[CapgateServer, CapgateServer], vllm_server: VllmServer
) -> None:
    vllm_server.wait_quiet()
    before = generated(vllm_server)
    rng = random.Random(13)
    jobs = [(replicas[i % 2].base_url, rng.random() < 0.5, rng.randint(1, 40)) for i in range(40)]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda j: send(j[0], EXACT, j[1], j[2]), jobs))
    events = {e["request_id"]: e for e in wait_for_events(replicas[0], EXACT, len(jobs))}
    assert len(events) == len(jobs)
    for request_id, prompt, output in results:
        event = events[request_id]
        assert (int(event["prompt_tokens"]), int(event["completion_tokens"])) == (prompt, output)
    vllm_server.wait_quiet()
    after = generated(vllm_server)
    assert sum(int(e["completion_tokens"]) for e in events.values()) == after[0] - before[0]
    assert sum(int(e["prompt_tokens"]) for e in events.values()) == after[1] - before[1]
    counted = sum(
        sample_sum(
            parse(httpx.get(f"{r.base_url}/metrics").text), "capgate_requests_total", {"route": "responses"}
        )
        for r in replicas
    )
    assert counted >= len(jobs)


def test_a_stored_response_is_its_creators_only(replicas: tuple[CapgateServer, CapgateServer]) -> None:
    """The owner reads, lists the input of, and continues a response, through either replica;
    another user gets a 404 for each, as for an id that does not exist. A continuation's prompt
    (the stored conversation and the new input) stays within the bound capgate reserved."""
    owner = openai_client(replicas[0].base_url, key_of(OWNER))
    other = openai_client(replicas[1].base_url, key_of(OTHER))
    first = owner.responses.create(model="tiny", input="Remember the word banana.", max_output_tokens=12)
    again = openai_client(replicas[1].base_url, key_of(OWNER)).responses.retrieve(first.id)
    assert again.id == first.id and again.output_text == first.output_text
    for attempt in (
        lambda: other.responses.retrieve(first.id),
        lambda: other.responses.cancel(first.id),
        lambda: other.responses.input_items.list(first.id),
        lambda: other.responses.create(
            model="tiny", input="and?", previous_response_id=first.id, max_output_tokens=5
        ),
        lambda: other.responses.retrieve("resp_" + uuid.uuid4().hex),
    ):
        with pytest.raises(openai.NotFoundError):
            attempt()
    second = owner.responses.create(
        model="tiny", input="Which word?", previous_response_id=first.id, max_output_tokens=12
    )
    third = owner.responses.stream(
        model="tiny", input="Say it again.", previous_response_id=second.id, max_output_tokens=12
    )
    with third as stream:
        final = stream.get_final_response()
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    assert final.usage.input_tokens > second.usage.input_tokens + second.usage.output_tokens
    events = {e["request_id"]: e for e in wait_for_events(replicas[0], OWNER, 3)}
    assert int(events[final.id.removeprefix("resp_")]["prompt_tokens"]) == final.usage.input_tokens
    exceeded = sum(
        sample_sum(parse(httpx.get(f"{r.base_url}/metrics").text), "capgate_prompt_bound_exceeded_total")
        for r in replicas
    )
    assert exceeded == 0, "a continuation's prompt went over its reserved bound"


def test_no_overshoot_with_concurrent_streams_of_every_route(
    replicas: tuple[CapgateServer, CapgateServer], vllm_server: VllmServer
) -> None:
    """60 streams of one user at once over both replicas, in turn responses, messages and chat
    completions, each asking more than a tenth of the cap: billed never over the cap, and equal
    to what vLLM generated."""
    vllm_server.wait_quiet()
    before = generated(vllm_server)[0]
    rng = random.Random(ROUND)
    asks = [rng.randint(CAP // 10 + 1, CAP // 4) for _ in range(60)]
    barrier = threading.Barrier(60)

    def one(i: int) -> int:
        base = replicas[i % 2].base_url
        barrier.wait()
        try:
            if i % 3 == 0:
                send(base, ROUND, True, asks[i])
            elif i % 3 == 1:
                sdk = anthropic.Anthropic(base_url=base, api_key=key_of(ROUND), max_retries=0)
                with sdk.messages.stream(
                    model="tiny", max_tokens=asks[i], messages=[{"role": "user", "content": text(ROUND)}]
                ) as s:
                    s.get_final_message()
            else:
                chunks = openai_client(base, key_of(ROUND)).chat.completions.create(
                    model="tiny",
                    messages=[{"role": "user", "content": text(ROUND)}],
                    max_tokens=asks[i],
                    stream=True,
                )
                for _ in chunks:
                    pass
            return 200
        except (anthropic.APIStatusError, openai.APIStatusError) as exc:
            return exc.status_code

    with ThreadPoolExecutor(60) as pool:
        statuses = list(pool.map(one, range(60)))
    served = statuses.count(200)
    assert served and set(statuses) <= {200, 429}, statuses
    events = wait_for_events(replicas[0], ROUND, served)
    assert len(events) == served
    vllm_server.wait_quiet()
    completion = sum(int(e["completion_tokens"]) for e in events)
    billed = completion + sum(int(e["prompt_tokens"]) for e in events)
    made = generated(vllm_server)[0] - before
    print(f"\n{served} of 60 streams served, billed {billed} of {CAP}, vLLM generated {made}")
    assert billed <= CAP and completion == made
    assert usage_left(replicas[1], ROUND)["day"] == CAP - billed


def test_hang_up_bills_the_prompt_bound_and_the_deltas_seen(
    replicas: tuple[CapgateServer, CapgateServer], vllm_server: VllmServer
) -> None:
    """vLLM's responses stream has no usage before its end: a hang-up bills the prompt at its
    reserved bound (never below vLLM's count) and the output at the deltas relayed and drained
    (never above what vLLM generated, at least a quarter of it)."""
    vllm_server.wait_quiet()
    before = generated(vllm_server)
    body = {"model": "tiny", "input": text(HANGUP), "max_output_tokens": 4000, "stream": True, "store": False}
    headers = {"authorization": f"Bearer {key_of(HANGUP)}"}
    with httpx.stream(
        "POST", f"{replicas[0].base_url}/v1/responses", json=body, headers=headers, timeout=60
    ) as r:
        assert r.status_code == 200
        deltas = 0
        for line in r.iter_lines():
            deltas += line == "event: response.output_text.delta"
            if deltas == 30:
                break
    deadline = time.monotonic() + 30
    while sample_sum(vllm_server.metrics(), "vllm:num_requests_running") > 0:
        assert time.monotonic() < deadline, "vLLM still runs the abandoned stream"
        time.sleep(0.05)
    [event] = wait_for_events(replicas[0], HANGUP, 1)
    vllm_server.wait_quiet()
    after = generated(vllm_server)
    made, prompt = after[0] - before[0], after[1] - before[1]
    billed = int(event["completion_tokens"])
    print(
        f"\nhung up after 30 deltas: billed {billed} of {made} generated, "
        f"prompt {event['prompt_tokens']} for {prompt}"
    )
    assert event["finish_reason"] == "client_disconnected"
    assert 30 <= billed <= made <= 4 * billed
    assert int(event["prompt_tokens"]) >= prompt > 0


def test_hostile_requests_are_400s_naming_the_parameter(
    replicas: tuple[CapgateServer, CapgateServer],
) -> None:
    sdk = openai_client(replicas[0].base_url, key_of(ERRORS))
    cases = [
        ({"background": True}, "background"),
        ({"request_id": "resp_someone-elses"}, "request_id"),
        ({"max_output_tokens": -100000}, "max_output_tokens"),
        ({"max_output_tokens": 2**40}, "max_output_tokens"),
        ({"previous_response_id": "not an id"}, "previous_response_id"),
        ({"input": []}, "input"),
        (
            {
                "input": [
                    {
                        "role": "user",
                        "content": [{"type": "input_image", "image_url": "http://127.0.0.1/x.png"}],
                    }
                ]
            },
            "input[0].content[0]",
        ),
    ]
    for fields, param in cases:
        with pytest.raises(openai.BadRequestError) as caught:
            sdk.responses.create(model="tiny", input="hi", extra_body=fields)
        assert caught.value.body["param"] == param, (fields, caught.value.body)
    assert usage_left(replicas[0], ERRORS)["day"] == CAP, "no refused request changed the budget"
