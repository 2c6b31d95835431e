"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}`."""

import json

from starlette.responses import Response


class APIError(Exception):
    """An error the gateway answers itself, without touching vLLM."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict[str, dict[str, str | None]]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> Response:
        return Response(
            json.dumps(self.body()),
            status_code=self.status,
            media_type="application/json",
            headers=self.headers,
        )


_SHOWN_PATH = 256  # characters of a request path an error message repeats


def route_error(method: str, path: str, status: int, headers: dict[str, str] | None = None) -> APIError:
    """The error for a request no route serves: an unknown path (404, as OpenAI words it) or a
    method the path does not take (405, with its `Allow` header); the path is shortened."""
    shown = path if len(path) <= _SHOWN_PATH else path[:_SHOWN_PATH] + "..."
    if status == 404:
        return APIError(404, f"Invalid URL ({method} {shown})", code="unknown_url")
    if status == 405:
        return APIError(
            405, f"Method not allowed ({method} {shown})", code="method_not_allowed", headers=headers
        )
    return APIError(status, f"cannot serve {method} {shown}", headers=headers)


def unauthorized(message: str) -> APIError:
    return APIError(
        401,
        message,
        type="authentication_error",
        code="invalid_api_key",
        headers={"WWW-Authenticate": "Bearer"},
    )


def rate_limited(message: str, code: str, retry_after: int) -> APIError:
    return APIError(
        429,
        message,
        type="rate_limit_error",
        code=code,
        headers={"Retry-After": str(retry_after)},
    )
