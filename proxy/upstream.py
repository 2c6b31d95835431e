"""The vLLM upstreams: one shared HTTP client, what each serves, how loaded each is.

A background poller reads each upstream's `/v1/models` (served models, their cards and context
length) and `/metrics` (`vllm:num_requests_waiting`, `vllm:num_requests_running`,
`vllm:kv_cache_usage_perc`). Load older than `stale_after_s` counts as unknown, never as idle.
An upstream's capacity (requests run at once) is its `slots` setting, else learned from those
gauges: the most vLLM ran while requests waited, on two readings in a row.
Requests go to the least loaded healthy upstream that serves the model.

An upstream that refuses the connection or answers garbage is taken out at once. One that is
only slow to answer a poll (vLLM's API process busy streaming on a loaded machine) or drops the
poll's connection stays in until `SLOW_POLLS_TO_EJECT` polls in a row failed so: a busy server
still serves, and ejecting it would turn a slow poll into 502s.
"""

import asyncio
import logging
import re
import time
from dataclasses import dataclass, field

import httpx

from metering.prompt import TemplateOverhead
from proxy import background
from proxy.settings import Settings, UpstreamSettings

log = logging.getLogger("capgate.upstream")

_SAMPLE = re.compile(r"^(vllm:[a-z_]+)(?:\{[^}]*\})? ([0-9.eE+-]+|NaN)$", re.MULTILINE)
_LOAD_METRICS = {
    "vllm:num_requests_waiting": "waiting",
    "vllm:num_requests_running": "running",
    "vllm:kv_cache_usage_perc": "kv_cache_usage",
}
SLOW_POLLS_TO_EJECT = 3
_PROBE_USER = {"role": "user", "content": ""}
_PROBE_ASSISTANT = {"role": "assistant", "content": ""}


@dataclass(frozen=True, slots=True)
class Load:
    """An upstream's load as last read from its `/metrics`."""

    waiting: float
    running: float
    kv_cache_usage: float
    read_at: float


@dataclass
class UpstreamState:
    """What is known of one upstream."""

    upstream: UpstreamSettings
    models: dict[str, int] = field(default_factory=dict)
    cards: dict[str, dict] = field(default_factory=dict)  # model id -> its card, as vLLM lists it
    overheads: dict[str, TemplateOverhead] = field(default_factory=dict)
    healthy: bool = False
    load: Load | None = None
    in_flight: int = 0
    seen_capacity: int = 0
    slow_polls: int = 0  # polls in a row that timed out or lost their connection

    @property
    def capacity(self) -> int | None:
        """The most requests it runs at once: configured, else the most vLLM was seen running
        while others waited (two readings in a row), else unknown."""
        return self.upstream.slots or self.seen_capacity or None

    def fresh_load(self, now: float, stale_after_s: float) -> Load | None:
        """The load if it is recent enough to act on, else None (unknown)."""
        if self.load is None or now - self.load.read_at > stale_after_s:
            return None
        return self.load


def parse_load(text: str, now: float) -> Load | None:
    """Sum vLLM's load gauges over their label sets; None when any is missing."""
    values: dict[str, float] = {}
    for name, value in _SAMPLE.findall(text):
        if name in _LOAD_METRICS:
            key = _LOAD_METRICS[name]
            values[key] = values.get(key, 0.0) + float(value)
    if len(values) != len(_LOAD_METRICS):
        return None
    return Load(values["waiting"], values["running"], values["kv_cache_usage"], now)


class UpstreamPool:
    """All configured upstreams and the one `httpx.AsyncClient` used to reach them. Generation
    requests go to the client's `transport` directly (`proxy.forward`): the client's own layers
    (URL merging, cookies, auth, redirects, event hooks) do nothing for them but cost time."""

    def __init__(
        self, settings: Settings, client: httpx.AsyncClient, transport: httpx.AsyncBaseTransport
    ) -> None:
        self.settings = settings
        self.client = client
        self.transport = transport
        self.timeouts = client.timeout.as_dict()  # what the client would hand its transport
        self.states = [UpstreamState(upstream) for upstream in settings.upstreams]
        self._urls: dict[tuple[str, str], httpx.URL] = {}
        self._poller: asyncio.Task[None] | None = None

    def url(self, state: UpstreamState, path: str) -> httpx.URL:
        """The URL of `path` on `state`'s upstream (parsed once)."""
        key = (state.upstream.url, path)
        found = self._urls.get(key)
        if found is None:
            found = self._urls[key] = httpx.URL(key[0] + path)
        return found

    def models(self) -> dict[str, int]:
        """Every model served by a healthy upstream, with its context length."""
        served: dict[str, int] = {}
        for state in self.states:
            if state.healthy:
                served.update(state.models)
        return served

    def model_cards(self) -> list[dict]:
        """The card of every model a healthy upstream serves, each id once (from the first
        upstream in the configured order that lists it)."""
        cards: dict[str, dict] = {}
        for state in self.states:
            if state.healthy:
                for model, card in state.cards.items():
                    cards.setdefault(model, card)
        return list(cards.values())

    def candidates(self, model: str, url: str | None = None) -> list[UpstreamState]:
        """The healthy upstreams serving `model` (only the one at `url` when given), least loaded
        first (vLLM's running and waiting requests, then this process's requests in flight;
        unknown load counts as none)."""
        serving = [
            state
            for state in self.states
            if state.healthy and model in state.models and (url is None or state.upstream.url == url)
        ]
        if len(serving) < 2:
            return serving
        now = time.monotonic()
        stale = self.settings.admission.stale_after_s

        def weight(state: UpstreamState) -> tuple[float, int]:
            load = state.fresh_load(now, stale)
            queued = load.waiting + load.running if load is not None else 0.0
            return (queued, state.in_flight)

        return sorted(serving, key=weight)

    def pick(self, model: str, url: str | None = None) -> UpstreamState | None:
        """The least loaded healthy upstream serving `model` (the one at `url` when given)."""
        found = self.candidates(model, url)
        return found[0] if found else None

    async def refresh(self, state: UpstreamState) -> None:
        """Re-read one upstream's models (and calibrate new ones) and load."""
        base = state.upstream.url
        try:
            models = (await self.client.get(f"{base}/v1/models", timeout=5.0)).json()
            cards = {card["id"]: card for card in models["data"]}
            served = {model: int(card.get("max_model_len") or 0) for model, card in cards.items()}
            metrics = await self.client.get(f"{base}/metrics", timeout=5.0)
        except (httpx.TimeoutException, httpx.ReadError, httpx.RemoteProtocolError) as exc:
            state.slow_polls += 1
            if state.healthy and state.slow_polls >= SLOW_POLLS_TO_EJECT:
                log.warning("upstream %s unreachable: %s (%d polls in a row)", state.upstream.label, exc,
                            state.slow_polls)  # fmt: skip
                state.healthy = False
            return
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            if state.healthy:
                log.warning("upstream %s unreachable: %s", state.upstream.label, exc)
            state.healthy = False
            return
        state.slow_polls = 0
        for model in served.keys() - state.overheads.keys():
            state.overheads[model] = await self._calibrate(base, model)
        state.models, state.cards = served, cards
        if not state.healthy:
            log.info("upstream %s serves %s", state.upstream.label, sorted(served))
        state.healthy = True
        before = state.load
        state.load = load = parse_load(metrics.text, time.monotonic()) if metrics.is_success else None
        if load is not None and before is not None and load.waiting > 0 and before.waiting > 0:
            state.seen_capacity = max(state.seen_capacity, int(min(load.running, before.running)))

    async def _count(self, base: str, payload: dict) -> int:
        reply = await self.client.post(f"{base}/tokenize", json=payload, timeout=5.0)
        reply.raise_for_status()
        return int(reply.json()["count"])

    async def _calibrate(self, base: str, model: str) -> TemplateOverhead:
        """Measure the chat template's token overhead with vLLM's own /tokenize."""
        try:
            one = await self._count(base, {"model": model, "messages": [_PROBE_USER]})
            three = await self._count(
                base, {"model": model, "messages": [_PROBE_USER, _PROBE_ASSISTANT, _PROBE_USER]}
            )
            plain = await self._count(base, {"model": model, "prompt": ""})
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            log.warning("cannot calibrate prompt bound of %s (%s): using defaults", model, exc)
            return TemplateOverhead()
        per_message = max(1, -(-(three - one) // 2)) + 1
        return TemplateOverhead(fixed=max(one, plain) + 2, per_message=per_message)

    async def count_prompt(self, state: UpstreamState, payload: dict) -> int:
        """The exact prompt tokens of a request, from the upstream's /tokenize."""
        return await self._count(state.upstream.url, payload)

    async def refresh_all(self) -> None:
        """Refresh every upstream; one that fails in an unexpected way is marked unhealthy (its
        answers cannot be trusted) and the error raised after the others were refreshed."""
        results = await asyncio.gather(
            *(self.refresh(state) for state in self.states), return_exceptions=True
        )
        errors = [
            (state, r) for state, r in zip(self.states, results, strict=True) if isinstance(r, Exception)
        ]
        for state, _ in errors:
            state.healthy = False
        if errors:
            raise errors[0][1]

    async def start(self) -> None:
        try:
            await self.refresh_all()
        except Exception as exc:
            log.error("first read of the upstreams failed: %r", exc, exc_info=exc)
        self._poller = background.start("upstream_poll", self.settings.admission.interval_s, self.refresh_all)

    async def stop(self) -> None:
        await background.stop(self._poller)
