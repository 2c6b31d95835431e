"""Reading what a client sent before anything is parsed: its API key, its body (bounded)."""

from starlette.requests import Request

from proxy.errors import APIError, unauthorized

MAX_KEY_CHARS = 512


def bearer_key(request: Request) -> str:
    """The API key of `Authorization: Bearer KEY`, or a 401."""
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        raise unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    if len(key) > MAX_KEY_CHARS:
        raise unauthorized("unknown API key")
    return key


def api_key(request: Request, header: str | None = None) -> str:
    """The API key of `header` (Anthropic clients send `x-api-key`) when given and sent, else
    the bearer key; or a 401."""
    if header is not None and (key := request.headers.get(header, "").strip()):
        if len(key) > MAX_KEY_CHARS:
            raise unauthorized("unknown API key")
        return key
    return bearer_key(request)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, or a 413 as soon as it passes `limit` bytes."""
    declared = request.headers.get("content-length")
    too_large = APIError(413, f"request body is over {limit} bytes", code="request_too_large")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)
