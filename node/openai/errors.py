"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with the matching status, so
the official clients raise the right exception class (BadRequestError, NotFoundError, ...)."""

from __future__ import annotations

from fastapi.responses import JSONResponse

TYPE_FOR_STATUS = {400: "invalid_request_error", 401: "authentication_error", 402: "insufficient_quota",
                   403: "permission_error", 404: "invalid_request_error", 409: "invalid_request_error",
                   413: "invalid_request_error", 429: "rate_limit_error"}


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or TYPE_FOR_STATUS.get(status, "server_error" if status >= 500 else "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


class ContextLengthExceeded(OpenAIError):
    """The prompt leaves no room in the model's context: refused before anything is generated."""

    def __init__(self, limit: int, got: int, *, param: str = "messages", what: str = "messages"):
        super().__init__(400, f"This model's maximum context length is {limit} tokens. However, your {what} "
                              f"resulted in {got} tokens. Please reduce the length of the {what}.",
                         param=param, code="context_length_exceeded")
        self.limit = limit
        self.got = got
