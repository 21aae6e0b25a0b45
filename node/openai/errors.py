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


# The OpenAPI description of what /v1 answers on failure: OpenAI's error object. The auth middleware's own
# 413 (body over the route's limit), 503 (busy) and a signed request's 401 keep the node's {error, detail}.
OPENAI_ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {
        "type": "object",
        "required": ["message", "type"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}},
    }},
}
_NODE_ERROR = {"$ref": "#/components/schemas/ErrorBody"}
_WHY = {400: "Invalid request (OpenAI's error object says which parameter)", 401: "Missing or invalid API key",
        402: "Not enough credit for a public-mesh model", 403: "The key's scope may not use this model",
        404: "No such model (or path)", 413: "Request body too large", 502: "The model failed",
        503: "No model can answer now, or the node is busy"}


def _error_response(status: int) -> dict:
    # A signed (not bearer) /v1 request that fails its signature gets the node's shape too.
    schema = {"anyOf": [OPENAI_ERROR_SCHEMA, _NODE_ERROR]} if status in (401, 413, 503) else OPENAI_ERROR_SCHEMA
    return {"description": _WHY[status], "content": {"application/json": {"schema": schema}}}


OPENAI_ERRORS = {status: _error_response(status) for status in _WHY}
STREAMED_200 = {200: {"description": "The answer, or with `stream: true` server-sent events",
                      "content": {"application/json": {}, "text/event-stream": {"schema": {"type": "string"}}}}}
