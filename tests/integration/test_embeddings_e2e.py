"""Embeddings through capgate, with the openai SDK: a second real vLLM runs the tiny model as an
embedding model (`--runner pooling --convert embed`) next to the session's generating one, and
capgate routes each model to the upstream that serves it. Prompt tokens are reserved and settled
exactly, priced as prompt tokens; a hard cap holds under concurrent requests of two replicas."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from tests.harness import RedisServer, VllmServer, sample_sum
from tests.harness.capgate_server import CapgateServer
from tests.harness.capgate_server import replicas as two_replicas
from tests.harness.clients import openai_client
from tests.harness.ledger import usage_left, wait_for_events
from tests.harness.policies import key_of, write_policy

pytestmark = pytest.mark.integration

# Many requests at once on a 2-core machine that also runs vLLM: more than the production 0.5 s
# for a Redis call before it counts as an outage.
BURST = {"timeouts": {"redis_s": 5.0}}

EMBED = "tiny-embed"
RUN = uuid.uuid4().hex[:8]  # user ids unique to this run: Redis outlives a module
CAP = 400
TIERS = {
    "metered": {
        "priority": 5,
        "prices": {
            "prompt": "0.20 USD/1M",
            "completion": "0.80 USD/1M",
            "models": {EMBED: {"prompt": "0.50 USD/1M"}},  # nano-USD per token: 200, 800; 500 for EMBED
        },
    },
    "capped": {"caps": {"windows": [{"per": "day", "tokens": CAP}]}},
}
EXACT, PRICED, ROUND, ERRORS = (f"{name}-{RUN}" for name in ("exact", "priced", "round", "errors"))
USERS = {EXACT: "metered", PRICED: "metered", ROUND: "capped", ERRORS: "capped"}


@pytest.fixture(scope="module")
def embedder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmServer]:
    server = VllmServer(
        extra_args=["--runner", "pooling", "--convert", "embed"],
        served_name=EMBED,
        log_path=tmp_path_factory.mktemp("embed-vllm") / "vllm.log",
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def replicas(
    tmp_path_factory: pytest.TempPathFactory,
    vllm_server: VllmServer,
    embedder: VllmServer,
    redis_server: RedisServer,
) -> Iterator[tuple[CapgateServer, CapgateServer]]:
    """Two capgate processes in front of both vLLMs, sharing one Redis, as two replicas would."""
    workdir = tmp_path_factory.mktemp("embeddings")
    policy = write_policy(workdir / "policy.yaml", TIERS, USERS)
    with two_replicas(
        workdir, ("a", "b"), [vllm_server.base_url, embedder.base_url], redis_server.url, policy, BURST
    ) as (a, b):
        yield a, b


def prompt_tokens(vllm: VllmServer) -> float:
    return sample_sum(vllm.metrics(), "vllm:prompt_tokens_total")


def test_embeddings_equal_vllms_own_and_are_billed_exactly(
    replicas: tuple[CapgateServer, CapgateServer], embedder: VllmServer
) -> None:
    inputs = ["hello world", ["one", "two", "three"], [[1, 2, 3, 4]], "ünïcödé ✓"]
    direct = openai_client(embedder.base_url, "unused").embeddings.create(model=EMBED, input=inputs[0])
    embedder.wait_quiet()
    before = prompt_tokens(embedder)
    ids, used = [], 0
    for i, given in enumerate(inputs * 5):
        sdk = openai_client(replicas[i % 2].base_url, key_of(EXACT))
        raw = sdk.embeddings.with_raw_response.create(model=EMBED, input=given)
        reply = raw.parse()
        ids.append(raw.headers["x-request-id"])
        used += reply.usage.prompt_tokens
        if i == 0:
            assert reply.data[0].embedding == pytest.approx(direct.data[0].embedding, abs=1e-5)
            assert reply.usage.prompt_tokens == direct.usage.prompt_tokens
    events = {e["request_id"]: e for e in wait_for_events(replicas[0], EXACT, len(ids))}
    assert set(events) == set(ids)
    assert all(int(e["completion_tokens"]) == 0 for e in events.values())
    assert all(int(e["value_nano"]) == 500 * int(e["prompt_tokens"]) for e in events.values()), (
        "EMBED's price"
    )
    assert sum(int(e["prompt_tokens"]) for e in events.values()) == used
    embedder.wait_quiet()
    assert prompt_tokens(embedder) - before == used, "billed equals vLLM's own prompt count"


def test_each_model_is_priced_at_its_own_rates(replicas: tuple[CapgateServer, CapgateServer]) -> None:
    """One user's chat completion takes the tier's default prices, its embedding the embedding
    model's own: the ledger's value is tokens times each model's prices, exactly."""
    sdk = openai_client(replicas[0].base_url, key_of(PRICED))
    chat = sdk.chat.completions.with_raw_response.create(
        model="tiny", messages=[{"role": "user", "content": "price me"}], max_tokens=7
    )
    embedding = sdk.embeddings.with_raw_response.create(model=EMBED, input="price me too")
    events = {e["request_id"]: e for e in wait_for_events(replicas[0], PRICED, 2)}
    usage = chat.parse().usage
    chat_event = events[chat.headers["x-request-id"]]
    assert int(chat_event["value_nano"]) == 200 * usage.prompt_tokens + 800 * usage.completion_tokens
    embed_event = events[embedding.headers["x-request-id"]]
    assert int(embed_event["value_nano"]) == 500 * embedding.parse().usage.prompt_tokens
    assert int(embed_event["value_nano"]) > 0


def test_no_overshoot_with_concurrent_embeddings_over_two_replicas(
    replicas: tuple[CapgateServer, CapgateServer], embedder: VllmServer
) -> None:
    """40 requests of one user at once, each bounded above a tenth of the cap: the prompt
    tokens billed never pass the cap, and equal vLLM's count."""
    embedder.wait_quiet()
    before = prompt_tokens(embedder)
    barrier = threading.Barrier(40)

    def one(i: int) -> int:
        sdk = openai_client(replicas[i % 2].base_url, key_of(ROUND))
        barrier.wait()
        try:
            sdk.embeddings.create(model=EMBED, input=f"request {i} " + "word " * 6)
            return 200
        except openai.APIStatusError as exc:
            return exc.status_code

    with ThreadPoolExecutor(40) as pool:
        statuses = list(pool.map(one, range(40)))
    served = statuses.count(200)
    assert served and set(statuses) <= {200, 429}, statuses
    events = wait_for_events(replicas[0], ROUND, served)
    billed = sum(int(e["prompt_tokens"]) for e in events)
    embedder.wait_quiet()
    print(f"\n{served} of 40 embeddings served, {billed} of {CAP} prompt tokens billed")
    assert len(events) == served and billed <= CAP
    assert prompt_tokens(embedder) - before == billed
    assert usage_left(replicas[1], ROUND)["day"] == CAP - billed


def test_hostile_inputs_are_400s_naming_the_parameter(replicas: tuple[CapgateServer, CapgateServer]) -> None:
    headers = {"authorization": f"Bearer {key_of(ERRORS)}"}
    cases = [
        ({"input": []}, "input"),
        ({"input": [-1]}, "input"),
        ({"input": ["ok", 5]}, "input[1]"),
        ({"input": "x", "dimensions": 0}, "dimensions"),
        ({"input": "x", "encoding_format": "hex"}, "encoding_format"),
        ({}, "input"),
    ]
    for fields, param in cases:
        reply = httpx.post(
            f"{replicas[0].base_url}/v1/embeddings",
            json={"model": EMBED, **fields},
            headers=headers,
            timeout=30,
        )
        assert reply.status_code == 400 and reply.json()["error"]["param"] == param, (fields, reply.text)
    assert usage_left(replicas[0], ERRORS)["day"] == CAP
