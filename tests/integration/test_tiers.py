"""Tier policies against a real vLLM and Redis: minted keys, refusing a bad policy, live reloads,
per-user concurrency across two proxies, vLLM's priority scheduler driven by the tier, load-aware
shedding, degraded admission and several upstreams.

This module runs its own vLLM (one at a time): `--max-num-seqs 2` for most tests, then
`--max-num-seqs 1` for the scheduling-order and shedding tests, so that vLLM has a waiting queue
for priorities to act on; with `--enable-per-request-metrics`, so that every response carries
vLLM's own queue time and time to first token. Timing tests print what they measured.

On this 2-core CPU machine a generating vLLM starves every sleeping process for seconds: tests
that must arrange vLLM's queue hold its engine still meanwhile (`EngineBrake`), and tests whose
stream must stay in flight reach vLLM over a throttled link (`RelayProxy`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from policies.keys import hash_key
from tests.harness import ProcessExitedError, RedisServer, VllmServer, free_port, parse, sample_sum
from tests.harness.capgate_server import CapgateServer
from tests.harness.clients import openai_client
from tests.harness.relay_proxy import RelayProxy

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
MODEL = "tiny"
MESSAGES = [{"role": "user", "content": "Tell me a long story."}]
RUN = uuid.uuid4().hex[:8]  # user ids unique to this run: Redis outlives a single test
NO_ADMISSION = {"admission": {"enabled": False}}
SLOW_LINK = 100_000  # bytes/s: a 400-token stream takes seconds to reach capgate
CONTINUOUS_USAGE = {"include_usage": True, "continuous_usage_stats": True}


# --- servers -------------------------------------------------------------------------------------


class Engine:
    """This module's vLLM: at most one at a time, restarted when a test needs other settings."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.server: VllmServer | None = None
        self.max_num_seqs: int | None = None

    def serving(self, max_num_seqs: int) -> VllmServer:
        if self.server is not None and self.max_num_seqs == max_num_seqs:
            return self.server
        self.stop()
        server = VllmServer(
            extra_args=[
                "--max-num-seqs",
                str(max_num_seqs),
                "--enable-per-request-metrics",
                "--enable-log-requests",
            ],
            log_path=self.workdir / f"vllm-seqs{max_num_seqs}.log",
        )
        server.start()
        self.server, self.max_num_seqs = server, max_num_seqs
        return server

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    engine = Engine(tmp_path_factory.mktemp("tiers-vllm"))
    try:
        yield engine
    finally:
        engine.stop()


@pytest.fixture
def vllm2(engine: Engine) -> VllmServer:
    """vLLM running at most two sequences at once."""
    return engine.serving(2)


@pytest.fixture
def vllm1(engine: Engine) -> VllmServer:
    """vLLM running one sequence at a time: every other request waits in its priority queue."""
    return engine.serving(1)


StartCapgate = Callable[..., CapgateServer]


@pytest.fixture
def start_capgate(tmp_path: Path, redis_server: RedisServer) -> Iterator[StartCapgate]:
    """Start capgate processes (upstreams, policy, settings) on the session's Redis; all are
    stopped after the test."""
    started: list[CapgateServer] = []

    def start(upstreams: list[str], policy: Path, settings: dict | None = None) -> CapgateServer:
        server = CapgateServer(
            tmp_path / f"capgate{len(started)}",
            upstreams=upstreams,
            redis_url=redis_server.url,
            policy=policy,
            settings=settings,
        )
        started.append(server)
        server.start()
        return server

    yield start
    for server in started:
        server.stop()


# --- policies, requests, metrics -----------------------------------------------------------------


def key_of(user: str) -> str:
    return f"cg-test-{user}"


def policy_yaml(tiers: dict[str, dict], users: dict[str, str]) -> str:
    """A policy of `tiers` and `users` (id -> tier); each user's key is `key_of(id)`."""
    policy = {
        "tiers": tiers,
        "users": [
            {"id": user, "tier": tier, "keys": [hash_key(key_of(user))]} for user, tier in users.items()
        ],
    }
    return yaml.safe_dump(policy, sort_keys=False)


def replace_file(path: Path, text: str) -> None:
    """Write `text` to `path` atomically (as editors that save by rename do)."""
    scratch = path.with_name(path.name + ".new")
    scratch.write_text(text)
    os.replace(scratch, path)


def chat(server: CapgateServer, user: str, **body: object) -> httpx.Response:
    payload = {"model": MODEL, "messages": MESSAGES, **body}
    headers = {"authorization": f"Bearer {key_of(user)}"}
    return httpx.post(f"{server.base_url}/v1/chat/completions", json=payload, headers=headers, timeout=120)


def error_code(reply: httpx.Response) -> str | None:
    return reply.json()["error"]["code"]


def gateway_metric(server: CapgateServer, name: str, labels: dict[str, str] | None = None) -> float:
    return sample_sum(parse(httpx.get(f"{server.base_url}/metrics", timeout=10).text), name, labels)


def outcomes(server: CapgateServer) -> dict[str, float]:
    """capgate_requests_total by outcome."""
    counts: dict[str, float] = {}
    for (name, labels), value in parse(httpx.get(f"{server.base_url}/metrics", timeout=10).text).items():
        if name == "capgate_requests_total":
            outcome = dict(labels)["outcome"]
            counts[outcome] = counts.get(outcome, 0) + value
    return counts


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.05)


def wait_settled(server: CapgateServer) -> None:
    """Wait until `server` holds no reservation (every request it served is settled)."""
    wait_until(
        lambda: gateway_metric(server, "capgate_reservations_outstanding") == 0,
        15,
        "capgate settles its requests",
    )


def async_client(server: CapgateServer, user: str) -> openai.AsyncOpenAI:
    """No retries; a timeout long enough for eight 900-token answers one after another on the CPU
    build (about 60 tokens/s for one long sequence here, so the last ends after about 2 minutes)."""
    return openai.AsyncOpenAI(
        base_url=f"{server.base_url}/v1", api_key=key_of(user), max_retries=0, timeout=300
    )


class EngineBrake:
    """Stops (SIGSTOP) and continues vLLM's engine processes while its API process keeps serving.

    On this CPU machine a generating vLLM starves every sleeping process (the test, capgate, even
    vLLM's own API process) for seconds at a time, so nothing can be arranged or observed while it
    generates. With the engine stopped everything else runs normally: a test queues requests,
    lets the engine take them in one short `pulse`, and reads vLLM's queue from its /metrics (the
    gauges keep the engine's last report; after several pulses they were seen to read 0 while
    requests still waited, so tests pulse once).
    """

    def __init__(self, vllm: VllmServer) -> None:
        assert vllm.pid is not None
        self.pids = [pid for pid in self._group(vllm.pid) if self._name(pid).startswith("VLLM::")]
        assert self.pids, "no vLLM engine process found"

    @staticmethod
    def _group(pgid: int) -> list[int]:
        members = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    if os.getpgid(int(entry.name)) == pgid:
                        members.append(int(entry.name))
        return members

    @staticmethod
    def _name(pid: int) -> str:
        try:
            return Path(f"/proc/{pid}/comm").read_text()
        except OSError:
            return ""

    def stop(self) -> None:
        for pid in self.pids:
            os.kill(pid, signal.SIGSTOP)

    def go(self) -> None:
        for pid in self.pids:
            os.kill(pid, signal.SIGCONT)

    def pulse(self, seconds: float) -> None:
        """Let the engine run for `seconds` (busy-waiting: a sleeping test would not wake)."""
        self.go()
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            pass
        self.stop()

    def __enter__(self) -> EngineBrake:
        self.stop()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.go()


async def until_vllm(
    vllm: VllmServer, predicate: Callable[[float, float], bool], what: str, timeout: float = 60
) -> None:
    """Wait until `predicate(running, waiting)` holds for vLLM's request counts."""
    deadline = time.monotonic() + timeout
    seen: list[tuple[float, float, float]] = []
    async with httpx.AsyncClient(timeout=10) as http:
        while True:
            samples = parse((await http.get(f"{vllm.base_url}/metrics")).text)
            running = sample_sum(samples, "vllm:num_requests_running")
            waiting = sample_sum(samples, "vllm:num_requests_waiting")
            if predicate(running, waiting):
                return
            seen.append((round(timeout - deadline + time.monotonic(), 2), running, waiting))
            assert time.monotonic() < deadline, (
                f"vLLM never reached: {what}; (s, running, waiting): {seen[:40]}"
            )
            await asyncio.sleep(0.05)  # vLLM renders /metrics on its API process: do not starve it


async def until_forwarded(server: CapgateServer, count: int) -> None:
    """Wait until `server` has sent `count` requests to vLLM (held or finished since it started)."""
    deadline = time.monotonic() + 60
    async with httpx.AsyncClient(timeout=10) as http:
        while True:
            samples = parse((await http.get(f"{server.base_url}/metrics")).text)
            held = sample_sum(samples, "capgate_reservations_outstanding")
            if held + sample_sum(samples, "capgate_requests_total") >= count:
                return
            assert time.monotonic() < deadline, f"capgate never forwarded {count} requests"
            await asyncio.sleep(0.01)


@dataclass(frozen=True)
class EngineTimes:
    """vLLM's own per-request timings (`--enable-per-request-metrics`), in seconds: waiting in its
    queue, from being scheduled to the first token, and from the first token to the last."""

    queue: float
    ttft: float
    generation: float

    @property
    def after_queue(self) -> float:
        """From being scheduled to the last token: how long the request held its sequence slot."""
        return self.ttft + self.generation


def engine_times(metrics: dict | None, label: str) -> EngineTimes:
    """vLLM's per-request `metrics` object as `EngineTimes`."""
    assert metrics, f"{label}: vLLM sent no per-request metrics"
    return EngineTimes(
        metrics["queue_time_ms"] / 1000,
        metrics["time_to_first_token_ms"] / 1000,
        metrics["generation_time_ms"] / 1000,
    )


@dataclass
class Timed:
    """One streamed request: when its client got the first content chunk (monotonic clock), how
    many tokens it got, and how vLLM timed it."""

    label: str
    first: float | None = None
    tokens: int = 0
    engine: EngineTimes | None = None

    @property
    def first_at(self) -> float:
        assert self.first is not None, f"{self.label} never got a content chunk"
        return self.first

    @property
    def timed_by_vllm(self) -> EngineTimes:
        assert self.engine is not None, f"{self.label}: vLLM sent no per-request metrics"
        return self.engine


async def timed_stream(client: openai.AsyncOpenAI, label: str, max_tokens: int, **extra: object) -> Timed:
    """Stream a chat completion of exactly `max_tokens` tokens; note when the first content came
    and vLLM's timings from the final usage chunk."""
    timed = Timed(label)
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=max_tokens,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True, **extra},
    )
    async for chunk in stream:
        if timed.first is None and any(choice.delta.content for choice in chunk.choices):
            timed.first = time.monotonic()
        if chunk.usage is not None:
            timed.tokens = chunk.usage.completion_tokens
        if (chunk.model_extra or {}).get("metrics"):
            timed.engine = engine_times(chunk.model_extra["metrics"], label)
    return timed


# --- keys and start-up ---------------------------------------------------------------------------


def test_minted_key_pasted_into_the_policy_authenticates(
    tmp_path: Path, vllm2: VllmServer, start_capgate: StartCapgate
) -> None:
    user = f"minted-{RUN}"
    minted = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "keys", "new", user, "--policy-file"],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    )
    key = minted.stdout.splitlines()[0].rsplit(": ", 1)[1]
    line = next(text for text in minted.stdout.splitlines() if text.strip().startswith('- "sha256:'))
    assert line.strip() == f'- "{hash_key(key)}"'
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        f"tiers:\n  pro: {{priority: 10}}\nusers:\n  - id: {user}\n    tier: pro\n    keys:\n{line}\n"
    )
    server = start_capgate([vllm2.base_url], policy, NO_ADMISSION)

    reply = openai_client(server.base_url, key).chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        max_tokens=3,
    )
    assert reply.usage is not None and reply.usage.completion_tokens == 3
    with pytest.raises(openai.AuthenticationError):
        openai_client(server.base_url, key + "x").models.list()


BROKEN_POLICIES = [
    pytest.param(
        "tiers:\n  free: {priority: 20}\nusers:\n  - id: a\n    tier: gold\n",
        ":5: users[0].tier: unknown tier 'gold'",
        id="unknown-tier",
    ),
    pytest.param(
        "tiers:\n  free:\n    priority: high\n",
        ":3: tiers.free.priority: Input should be a valid integer",
        id="wrong-type",
    ),
    pytest.param(None, ": cannot read:", id="missing-file"),
]


@pytest.mark.parametrize(("text", "expected"), BROKEN_POLICIES)
def test_server_refuses_to_start_on_an_invalid_policy_and_says_why(
    tmp_path: Path, redis_server: RedisServer, text: str | None, expected: str
) -> None:
    policy = tmp_path / "policy.yaml"
    if text is not None:
        policy.write_text(text)
    server = CapgateServer(
        tmp_path / "capgate",
        upstreams=[f"http://127.0.0.1:{free_port()}"],
        redis_url=redis_server.url,
        policy=policy,
    )
    try:
        with pytest.raises(ProcessExitedError):
            server.start(wait_ready=False, timeout=60)
        assert server.process.returncode == 2
        log = server.log_text()
        assert "capgate: refusing to start" in log
        assert f"{policy}{expected}" in log, log
    finally:
        server.stop()


# --- reload --------------------------------------------------------------------------------------

ROOMY = {"priority": 10, "lease_tokens": 64, "caps": {"per_request": 2048, "count": ["completion"]}}
TIGHT = {"priority": 20, "caps": {"windows": [{"per": "day", "tokens": 30}]}}


def reload_settings(trigger: str) -> dict:
    """SIGHUP only (the file watcher asleep for an hour), or the file watcher polling at 0.2 s."""
    return {**NO_ADMISSION, "policy_poll_s": 3600 if trigger == "sighup" else 0.2}


def apply(server: CapgateServer, policy: Path, text: str, trigger: str, result: str) -> None:
    """Replace the policy file, send SIGHUP if that is the trigger, and wait for the reload's
    `result` ("applied" or "rejected") on /metrics."""
    labels = {"outcome": result}
    before = gateway_metric(server, "capgate_policy_reloads_total", labels)
    replace_file(policy, text)
    if trigger == "sighup":
        server.reload()
    wait_until(
        lambda: gateway_metric(server, "capgate_policy_reloads_total", labels) == before + 1,
        10,
        f"policy reload {result}",
    )


@pytest.mark.parametrize("trigger", ["sighup", "file"])
@pytest.mark.parametrize("change", ["cap-lowered", "moved-tier"])
def test_reload_applies_to_the_next_request_while_a_started_stream_finishes_untouched(
    tmp_path: Path, vllm2: VllmServer, start_capgate: StartCapgate, trigger: str, change: str
) -> None:
    """The stream is leased (its allowance is extended in Redis as it goes, on its tier's terms),
    so it would be cut short if the new policy reached it; it reaches capgate over a slow link that
    holds it while the new policy comes into force (checked on /metrics)."""
    user = f"mover-{trigger}-{change}-{RUN}"
    policy = tmp_path / "policy.yaml"
    policy.write_text(policy_yaml({"roomy": ROOMY, "tight": TIGHT}, {user: "roomy"}))
    if change == "cap-lowered":
        lowered = {**ROOMY, "caps": {**ROOMY["caps"], "per_request": 100}}
        new_policy = policy_yaml({"roomy": lowered, "tight": TIGHT}, {user: "roomy"})
    else:
        new_policy = policy_yaml({"roomy": ROOMY, "tight": TIGHT}, {user: "tight"})
    probe = {"max_tokens": 300, "ignore_eos": True}

    with RelayProxy(vllm2.base_url, bytes_per_s=SLOW_LINK) as link:
        server = start_capgate([link.base_url], policy, reload_settings(trigger))
        pid = server.process.pid
        before = chat(server, user, **probe)
        assert before.status_code == 200 and before.json()["usage"]["completion_tokens"] == 300

        stream = openai_client(server.base_url, key_of(user)).chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            max_tokens=600,
            stream=True,
            stream_options=CONTINUOUS_USAGE,
            extra_body={"ignore_eos": True},
        )
        chunks = iter(stream)
        seen = [next(chunks) for _ in range(3)]
        with link.hold():
            apply(server, policy, new_policy, trigger, "applied")
            assert gateway_metric(server, "capgate_reservations_outstanding") == 1, "the stream is in flight"

            after = chat(server, user, **probe)
            if change == "cap-lowered":
                assert after.status_code == 200, after.text
                assert after.json()["usage"]["completion_tokens"] == 100
                assert after.json()["choices"][0]["finish_reason"] == "length"
            else:
                assert after.status_code == 429, after.text
                assert error_code(after) == "cap_exceeded"

        seen += list(chunks)
    usage = [chunk.usage for chunk in seen if chunk.usage is not None]
    finishes = [choice.finish_reason for chunk in seen for choice in chunk.choices if choice.finish_reason]
    assert usage[-1].completion_tokens == 600
    assert finishes == ["length"]
    assert server.process.pid == pid and server.process.running, "no restart"
    wait_settled(server)
    assert "cut_at_budget" not in outcomes(server)


@pytest.mark.parametrize("trigger", ["sighup", "file"])
def test_invalid_new_policy_is_rejected_and_the_old_one_stays_in_force(
    tmp_path: Path, vllm2: VllmServer, start_capgate: StartCapgate, trigger: str
) -> None:
    user = f"keeper-{trigger}-{RUN}"
    capped = {**ROOMY, "caps": {**ROOMY["caps"], "per_request": 100}}
    policy = tmp_path / "policy.yaml"
    good = policy_yaml({"roomy": capped}, {user: "roomy"})
    policy.write_text(good)
    server = start_capgate([vllm2.base_url], policy, reload_settings(trigger))
    probe = {"max_tokens": 300, "ignore_eos": True}

    broken = good.replace("priority: 10", "priority: high", 1)
    line = 1 + broken.splitlines().index("    priority: high")
    apply(server, policy, broken, trigger, "rejected")
    wait_until(lambda: "policy reload rejected" in server.log_text(), 5, "the rejection is logged")
    log = server.log_text()
    assert "keeping the previous policy" in log
    assert f"{policy}:{line}: tiers.roomy.priority: Input should be a valid integer" in log, log

    still = chat(server, user, **probe)
    assert still.status_code == 200 and still.json()["usage"]["completion_tokens"] == 100

    apply(server, policy, good.replace("per_request: 100", "per_request: 50"), trigger, "applied")
    fixed = chat(server, user, **probe)
    assert fixed.status_code == 200 and fixed.json()["usage"]["completion_tokens"] == 50


# --- per-user concurrency across two proxies ----------------------------------------------------


StreamSpec = tuple[CapgateServer, str, str, dict]  # server, user, path, body


@contextlib.contextmanager
def open_streams(*specs: StreamSpec) -> Iterator[list[Iterator[str]]]:
    """Raw streamed requests, sent at once, each with its first event read; yields the rest of
    their lines. Leaving the block closes the connections (a hang-up for a stream not ended)."""

    def send(spec: StreamSpec) -> tuple[httpx.Client, httpx.Response]:
        server, user, path, body = spec
        client = httpx.Client(timeout=120)
        headers = {"authorization": f"Bearer {key_of(user)}"}
        request = client.build_request("POST", f"{server.base_url}{path}", json=body, headers=headers)
        return client, client.send(request, stream=True)

    with contextlib.ExitStack() as stack, ThreadPoolExecutor(len(specs)) as pool:
        streams = []
        for client, reply in pool.map(send, specs):
            stack.callback(client.close)
            stack.callback(reply.close)
            assert reply.status_code == 200, reply.read()
            lines = reply.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            streams.append(lines)
        yield streams


def assert_concurrency_refused(servers: list[CapgateServer], user: str) -> None:
    for index, server in enumerate(servers):
        reply = chat(server, user, max_tokens=2)
        assert reply.status_code == 429, f"proxy {index} served a request over {user}'s limit: {reply.text}"
        assert error_code(reply) == "concurrency_exceeded"


def test_concurrency_limit_holds_across_two_proxies_and_every_ending_frees_the_slot(
    tmp_path: Path, vllm2: VllmServer, start_capgate: StartCapgate
) -> None:
    """Streams reach the proxies over a slow link, so each is surely in flight during the checks."""
    ender, hanger, cutter = f"ender-{RUN}", f"hanger-{RUN}", f"cutter-{RUN}"
    solo = {"priority": 10, "max_concurrent": 1}
    duo = {
        "priority": 10,
        "max_concurrent": 2,
        "lease_tokens": 16,
        "caps": {"windows": [{"per": "day", "tokens": 2300}]},
    }
    policy = tmp_path / "policy.yaml"
    policy.write_text(policy_yaml({"solo": solo, "duo": duo}, {ender: "solo", hanger: "solo", cutter: "duo"}))
    # Over the slow link a chat chunk of ~250 bytes is ~2.5 ms: the ender's stream lasts ~3 s, the
    # hanger's would last ~10 s if it were read, so each is surely still running during its checks.
    long_chat = {"model": MODEL, "messages": MESSAGES, "max_tokens": 1200, "stream": True, "ignore_eos": True}
    hanging_chat = {**long_chat, "max_tokens": 4000}
    # Two leased streams of one user compete for a day's cap that cannot hold both, even counted
    # exactly (2 x 1200 completion tokens and their prompts over 2300), in whatever order they run:
    # an extension is refused and the relay cuts.
    long_prompt = {
        "model": MODEL,
        "prompt": "budget " * 100,
        "max_tokens": 1200,
        "stream": True,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }
    short_prompt = {**long_chat, "max_tokens": 1200, "stream_options": {"include_usage": True}}

    with RelayProxy(vllm2.base_url, bytes_per_s=SLOW_LINK) as link:
        first = start_capgate([link.base_url], policy, NO_ADMISSION)
        second = start_capgate([link.base_url], policy, NO_ADMISSION)
        both = [first, second]

        with open_streams((first, ender, "/v1/chat/completions", long_chat)) as [lines]:
            assert_concurrency_refused(both, ender)
            assert "data: [DONE]" in list(lines)
        wait_settled(first)
        assert chat(second, ender, max_tokens=2).status_code == 200, "slot back after the request ended"

        with open_streams((first, hanger, "/v1/chat/completions", hanging_chat)):
            assert_concurrency_refused(both, hanger)
        wait_settled(first)
        assert outcomes(first).get("client_disconnected") == 1
        assert chat(second, hanger, max_tokens=2).status_code == 200, "slot back after the client hung up"

        with open_streams(
            (first, cutter, "/v1/completions", long_prompt),
            (second, cutter, "/v1/chat/completions", short_prompt),
        ) as pair:
            assert_concurrency_refused(both, cutter)
            streams = [[line for line in lines if line.startswith("data: {")] for lines in pair]
        wait_settled(first)
        wait_settled(second)
        cuts = sum(outcomes(server).get("cut_at_budget", 0) for server in both)
        # The cap may now be spent; the slot check comes first in the reservation, so any answer but
        # a concurrency refusal shows both slots are back.
        after = chat(second, cutter, max_tokens=2)
        assert after.status_code == 200 or error_code(after) == "cap_exceeded", "slots back after the cut"
    delivered = [json.loads(events[-1][6:])["usage"]["completion_tokens"] for events in streams]
    print(f"\ntwo streams of one user under a day cap of 2300: {delivered} completion tokens, {cuts:.0f} cut")
    assert cuts >= 1 and min(delivered) < 1200 and sum(delivered) < 2300
    assert all('"finish_reason":"length"' in "".join(events) for events in streams)


# --- several upstreams, degraded admission --------------------------------------------------------


def test_routes_over_healthy_upstreams_and_never_to_a_dead_one(
    tmp_path: Path, vllm2: VllmServer, start_capgate: StartCapgate
) -> None:
    user = f"router-{RUN}"
    policy = tmp_path / "policy.yaml"
    policy.write_text(policy_yaml({"pro": {"priority": 10}}, {user: "pro"}))
    dead = f"http://127.0.0.1:{free_port()}"
    # Load read once at start (both healthy upstreams idle): ties are broken by requests in flight.
    vllm2.wait_quiet()
    settings = {"admission": {"enabled": False, "interval_s": 60, "stale_after_s": 120}}
    with RelayProxy(vllm2.base_url) as relay:
        server = start_capgate([dead, vllm2.base_url, relay.base_url], policy, settings)

        async def burst() -> list[Timed]:
            client = async_client(server, user)
            tasks = []
            for index in range(8):
                tasks.append(asyncio.create_task(timed_stream(client, f"r{index}", 200)))
                await asyncio.sleep(0.1)
            try:
                return await asyncio.gather(*tasks)
            finally:
                await client.close()

        results = asyncio.run(burst())
        via_relay = relay.paths["/v1/chat/completions"]
    print(f"\n8 streams: {via_relay} through the second upstream, {8 - via_relay} direct, 0 to the dead one")
    assert [r.tokens for r in results] == [200] * 8
    assert 0 < via_relay < 8, "both healthy upstreams serve"
    assert gateway_metric(server, "capgate_upstream_errors_total") == 0, "nothing was sent to the dead one"


def test_admission_degrades_to_forwarding_when_vllm_metrics_are_unreadable(
    tmp_path: Path, vllm2: VllmServer, start_capgate: StartCapgate
) -> None:
    low = f"degraded-low-{RUN}"
    policy = tmp_path / "policy.yaml"
    policy.write_text(policy_yaml({"top": {"priority": 0}, "low": {"priority": 20}}, {low: "low"}))
    settings = {"admission": {"enabled": True, "max_waiting": 0, "interval_s": 0.2, "stale_after_s": 1}}
    with RelayProxy(vllm2.base_url, hide_metrics=True) as relay:
        server = start_capgate([relay.base_url], policy, settings)
        wait_until(lambda: gateway_metric(server, "capgate_admission_degraded") == 1, 10, "degraded gauge")
        # With max_waiting 0 vLLM would always count as saturated: only degraded admission serves.
        reply = chat(server, low, max_tokens=5, ignore_eos=True)
        assert relay.paths["/metrics"] > 0 and relay.paths["/v1/chat/completions"] == 1
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["usage"]["completion_tokens"] == 5 and body["system_fingerprint"].startswith("vllm-")
    assert "admission forwards all" in server.log_text()


# --- priority: time to first token under saturation -------------------------------------------------

TWO_TIERS = {"high": {"priority": 0}, "low": {"priority": 20}}


def two_tier_gateway(
    tmp_path: Path, vllm: VllmServer, start_capgate: StartCapgate
) -> tuple[CapgateServer, str, str]:
    high, low = f"high-{RUN}", f"low-{RUN}"
    policy = tmp_path / "policy.yaml"
    policy.write_text(policy_yaml(TWO_TIERS, {high: "high", low: "low"}))
    return start_capgate([vllm.base_url], policy, NO_ADMISSION), high, low


def test_high_tier_time_to_first_token_stays_low_while_low_tier_streams_queue(
    tmp_path: Path, vllm2: VllmServer, start_capgate: StartCapgate
) -> None:
    """24 low-tier streams of 100 tokens are queued in vLLM (two run at a time), then 6 high-tier
    streams of 16 tokens arrive behind them. A high one waits only for the next free slot, a low
    one for everything ahead of it.

    Requests are sent while `EngineBrake` holds the engine (a generating vLLM starves this test's
    own process on this machine, so it could not send on time), so all are queued when it starts.
    Time to first token is taken twice, both counted from the first token of the whole batch (a
    stall of the machine before vLLM gets going then counts for neither tier): by the client (the
    first content chunk the openai SDK yields) and by vLLM itself (queue time plus time to first
    token, relayed by capgate on the final usage chunk). Both are printed; the ratio is asserted
    on vLLM's, because on this machine the delivery of chunks to every process stalls for seconds
    while vLLM generates, which can blur the client's.
    """
    server, high, low = two_tier_gateway(tmp_path, vllm2, start_capgate)

    async def workload() -> tuple[list[Timed], list[Timed]]:
        low_client, high_client = async_client(server, low), async_client(server, high)
        try:
            with EngineBrake(vllm2):
                lows = [asyncio.create_task(timed_stream(low_client, f"low{i}", 100)) for i in range(24)]
                await until_forwarded(server, 24)
                await asyncio.sleep(0.3)  # vLLM's API process hands them to the engine first
                highs = [asyncio.create_task(timed_stream(high_client, f"high{i}", 16)) for i in range(6)]
                await until_forwarded(server, 30)
                await asyncio.sleep(0.3)
            return await asyncio.gather(*lows), await asyncio.gather(*highs)
        finally:
            await low_client.close()
            await high_client.close()

    lows, highs = asyncio.run(workload())
    assert [t.tokens for t in lows] == [100] * 24 and [t.tokens for t in highs] == [16] * 6

    def medians(first_token: Callable[[Timed], float]) -> tuple[float, float, float]:
        start = min(map(first_token, [*lows, *highs]))
        high_median = statistics.median(first_token(t) - start for t in highs)
        low_median = statistics.median(first_token(t) - start for t in lows)
        return high_median, low_median, high_median / low_median

    client = medians(lambda t: t.first_at)
    engine = medians(lambda t: t.timed_by_vllm.queue + t.timed_by_vllm.ttft)
    for source, (high_median, low_median, ratio) in (("client", client), ("vLLM", engine)):
        print(
            f"\nTTFT median ({source}): high {high_median * 1000:.0f} ms (6 streams), "
            f"low {low_median * 1000:.0f} ms (24 streams), ratio {ratio:.2f}"
        )
    assert engine[2] < 0.5


# --- priority: what vLLM schedules ---------------------------------------------------------------


async def unary_timed(
    client: openai.AsyncOpenAI, label: str, max_tokens: int, **extra: object
) -> tuple[str, EngineTimes]:
    """A unary chat completion of exactly `max_tokens` tokens: its id, and vLLM's timings of it."""
    reply = await client.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=max_tokens, extra_body={"ignore_eos": True, **extra}
    )
    assert reply.usage is not None and reply.usage.completion_tokens == max_tokens
    return reply.id, engine_times((reply.model_extra or {}).get("metrics"), label)


def engine_arrivals(vllm: VllmServer, ids: list[str]) -> list[str]:
    """`ids` in the order vLLM's API process handed them to its engine (its `Added request` log
    lines, written with `--enable-log-requests`)."""
    added = [
        line for line in vllm.log_path.read_text(errors="replace").splitlines() if "Added request" in line
    ]
    position = {
        request_id: next(i for i, line in enumerate(added) if request_id in line) for request_id in ids
    }
    return sorted(ids, key=position.__getitem__)


@pytest.mark.parametrize(
    ("low_asks", "high_asks"),
    [
        pytest.param({}, {"priority": 999}, id="high-client-asks-999"),
        pytest.param({"priority": -1000}, {}, id="low-clients-ask-minus-1000"),
    ],
)
def test_vllm_schedules_by_the_tier_priority_not_the_clients_own(
    tmp_path: Path, vllm1: VllmServer, start_capgate: StartCapgate, low_asks: dict, high_asks: dict
) -> None:
    """vLLM runs one sequence at a time. Eight low-tier requests of 900 tokens reach vLLM's engine,
    then a high-tier request (the order is checked in vLLM's own log). vLLM must run the high one
    ahead of the low ones, whatever `priority` the clients wrote. `EngineBrake` holds the engine
    still while the requests are sent, so that the arrival order is as intended and close together.

    Judged from vLLM's own per-request timings (the engine's clock): the high request waited
    less than the longest low run (in arrival order, or by the clients' numbers, it would have
    waited for all eight), and at least five low requests were scheduled only after it had ended
    (each waited longer than the high one's wait plus its run, which in arrival order no low one
    could: they arrived less than one low run earlier).
    """
    server, high, low = two_tier_gateway(tmp_path, vllm1, start_capgate)

    async def workload() -> tuple[list[tuple[str, EngineTimes]], tuple[str, EngineTimes]]:
        low_client, high_client = async_client(server, low), async_client(server, high)
        try:
            with EngineBrake(vllm1):
                lows = [
                    asyncio.create_task(unary_timed(low_client, f"low{i}", 900, **low_asks)) for i in range(8)
                ]
                await until_forwarded(server, 8)
                await asyncio.sleep(0.5)  # vLLM's API process hands them to the engine, in order
                overtaker = asyncio.create_task(unary_timed(high_client, "high", 20, **high_asks))
                await until_forwarded(server, 9)
                await asyncio.sleep(0.3)
            return await asyncio.gather(*lows), await overtaker
        finally:
            await low_client.close()
            await high_client.close()

    lows, (high_id, high_run) = asyncio.run(workload())
    low_ids = [request_id for request_id, _ in lows]
    assert engine_arrivals(vllm1, [*low_ids, high_id])[-1] == high_id, "the low requests reached vLLM first"
    runs = [times for _, times in lows]
    overtaken = [t for t in runs if t.queue > high_run.queue + high_run.after_queue]
    print(
        f"\nvLLM: high waited {high_run.queue * 1000:.0f} ms and ran {high_run.after_queue * 1000:.0f} ms; "
        f"lows waited {[round(t.queue * 1000) for t in runs]} ms and ran "
        f"{[round(t.after_queue * 1000) for t in runs]} ms; {len(overtaken)} lows overtaken"
    )
    assert high_run.queue < max(t.after_queue for t in runs)
    assert len(overtaken) >= 5


# --- load-aware admission: shedding ---------------------------------------------------------------

THREE_TIERS = {"top": {"priority": 0}, "mid": {"priority": 10}, "low": {"priority": 20}}
SHEDDING = {"admission": {"max_waiting": 1, "queue_timeout_s": 1, "interval_s": 0.2, "stale_after_s": 2}}


async def outcome(client: openai.AsyncOpenAI, max_tokens: int = 8) -> str:
    """The outcome of a unary request: "ok", or the code of the error it got."""
    try:
        await client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=max_tokens, extra_body={"ignore_eos": True}
        )
    except openai.APIStatusError as exc:
        return str(exc.code)
    return "ok"


def test_under_saturation_the_lowest_tier_is_shed_first_and_the_top_tier_never(
    tmp_path: Path, vllm1: VllmServer, start_capgate: StartCapgate
) -> None:
    """Top-tier requests saturate vLLM: one runs, three wait (arranged with the engine held still
    by `EngineBrake`, so that capgate keeps reading a saturated vLLM). Then a burst: 6 low, 6 mid
    and 3 top requests. The mid and low ones wait in admission, best priority first; whoever still
    waits after `queue_timeout_s` is shed with 429 `server_overloaded`. Top-tier requests are never
    held: they go to vLLM and are served once the engine runs again."""
    users = {tier: f"shed-{tier}-{RUN}" for tier in THREE_TIERS}
    policy = tmp_path / "policy.yaml"
    policy.write_text(policy_yaml(THREE_TIERS, {user: tier for tier, user in users.items()}))
    server = start_capgate([vllm1.base_url], policy, SHEDDING)

    async def queued() -> tuple[float, float]:
        async with httpx.AsyncClient() as http:
            samples = parse((await http.get(f"{server.base_url}/metrics", timeout=10)).text)
        gauge = "capgate_admission_queue_length"
        return sample_sum(samples, gauge, {"tier": "mid"}), sample_sum(samples, gauge, {"tier": "low"})

    async def burst() -> dict[str, list[str]]:
        clients = {tier: async_client(server, user) for tier, user in users.items()}
        try:
            with EngineBrake(vllm1) as brake:
                saturators = [asyncio.create_task(outcome(clients["top"], 900)) for _ in range(4)]
                await until_forwarded(server, 4)
                await asyncio.sleep(0.3)  # vLLM's API process hands them to the engine
                brake.pulse(0.3)  # the engine takes them in and starts one
                await until_vllm(
                    vllm1, lambda running, waiting: waiting >= 2, "top requests waiting", timeout=5
                )
                await asyncio.sleep(0.6)  # capgate reads vLLM's load every 0.2 s

                lows = [asyncio.create_task(outcome(clients["low"])) for _ in range(6)]
                await asyncio.sleep(0.02)
                mids = [asyncio.create_task(outcome(clients["mid"])) for _ in range(6)]
                tops = [asyncio.create_task(outcome(clients["top"])) for _ in range(3)]
                deadline = time.monotonic() + 5
                while await queued() != (6, 6):
                    assert time.monotonic() < deadline, "the mid and low requests never all queued"
                    await asyncio.sleep(0.02)
                lower = {"mid": await asyncio.gather(*mids), "low": await asyncio.gather(*lows)}
                async with httpx.AsyncClient() as http:
                    page = (await http.get(f"{server.base_url}/metrics", timeout=10)).text
                assert sample_sum(parse(page), "capgate_admission_degraded") == 0, "capgate read vLLM's load"
            return {"top": await asyncio.gather(*saturators, *tops), **lower}
        finally:
            for client in clients.values():
                await client.close()

    results = asyncio.run(burst())
    shed = {tier: outcomes.count("server_overloaded") for tier, outcomes in results.items()}
    admitted = {tier: outcomes.count("ok") for tier, outcomes in results.items()}
    print(f"\nburst outcomes: shed {shed}, admitted {admitted}")
    assert results["top"] == ["ok"] * 7, "the top tier is never shed"
    assert set(results["mid"]) | set(results["low"]) <= {"ok", "server_overloaded"}
    assert shed["low"] >= shed["mid"] and shed["low"] > 0
    assert admitted["low"] == 0 or shed["mid"] == 0, "a low request got through while a mid one was shed"
    for tier in ("mid", "low"):
        assert gateway_metric(server, "capgate_admission_shed_total", {"tier": tier}) == shed[tier]
    assert asyncio.run(queued()) == (0, 0)
