"""The one error type of the HTTP API and the one builder of OpenAI-shaped error bodies."""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse


class APIError(Exception):
    """A failure to report to the client as `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """The JSON body for this error."""
        return error_body(self.message, type=self.type, param=self.param, code=self.code)

    def response(self) -> JSONResponse:
        """This error as an HTTP response (an ASGI app too), with its status and headers."""
        return JSONResponse(self.body(), status_code=self.status_code, headers=self.headers)


def error_body(
    message: str, *, type: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """OpenAI error object; every error response of the worker goes through here."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def internal_error() -> APIError:
    """500 for a failure the client can do nothing about; its details stay in the worker log."""
    return APIError(500, "Internal server error", type="server_error", code="internal_error")


def invalid_param(param: str, message: str, code: str = "invalid_value") -> APIError:
    """400 for a request field, naming it."""
    return APIError(400, message, param=param, code=code)
