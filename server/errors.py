"""Errors the API returns, shaped like OpenAI's: ``{"error": {"message", "type", "param",
"code"}}`` with a matching HTTP status, so OpenAI clients raise their usual exception types."""

from __future__ import annotations

from fastapi.responses import JSONResponse

ECHO_LIMIT = 40  # characters of a client's value an error message may quote

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}


class ApiError(Exception):
    """A request the server will not serve; raised anywhere, rendered by the app's handler."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict:
        return error_body(self.status, self.message, param=self.param, code=self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def error_body(
    status: int, message: str, *, param: str | None = None, code: str | None = None
) -> dict:
    kind = ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def shown(value: str, limit: int = ECHO_LIMIT) -> str:
    """A client's value as an error message quotes it: cut to ``limit`` characters, control
    characters escaped. Header values are never quoted (a key pasted in the wrong header would
    come back), only body fields, and only this way (a megabyte field is not echoed)."""
    return repr(value if len(value) <= limit else value[:limit] + "…")
