"""What differs between the generation APIs capgate meters, in one record per API.

The gateway runs every API's requests through one lifecycle (authenticate, validate, plan,
admit, reserve, forward, settle); a `Dialect` supplies the parts that are the API's own: where
the key is sent, how a body is validated, how an error is rendered, the prompt bounds, whether
its streams carry running usage (so can be leased, cut and preempted), and how vLLM is asked.
"""

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import Response

from metering.meter import Meter, StoredResponse
from metering.prompt import TemplateOverhead
from metering.stream_budget import StreamBudget
from policies.index import Principal
from proxy.errors import APIError
from proxy.flight import Flight
from proxy.generation import GenerationRequest
from proxy.inbound import api_key
from proxy.streaming import Finish
from proxy.upstream import UpstreamPool, UpstreamState

Serve = Callable[[UpstreamPool, Meter, Flight, StreamBudget, Finish, int, int], Awaitable[Response]]
Prior = Callable[[Meter, Principal, GenerationRequest], Awaitable[StoredResponse | None]]


@dataclass(frozen=True, slots=True)
class Dialect:
    """One generation API. `serve(pool, meter, flight, budget, finish, priority, context)` sends
    the request to vLLM and answers the client; `leases`: its streams show running usage, so they
    may reserve by leases, be cut at a refused one and be preempted; `prior`: the stored response
    a request continues (its conversation is part of the prompt, and it is served by the upstream
    that stores it)."""

    name: str
    parse: Callable[[bytes], GenerationRequest]
    render: Callable[[APIError], Response]
    local_bound: Callable[[GenerationRequest, TemplateOverhead], int]
    exact_bound: Callable[[UpstreamPool, UpstreamState, GenerationRequest], Awaitable[int]]
    serve: Serve
    leases: bool = True
    generates: bool = True  # False: nothing but the prompt is reserved (embeddings)
    prior: Prior | None = None
    key_header: str | None = None  # a header that may carry the key instead of `Authorization`

    def key(self, request: Request) -> str:
        """The caller's API key, or a 401."""
        return api_key(request, self.key_header)
