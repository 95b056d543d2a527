"""Errors as each API spells them: OpenAI's {"error": {...}} and Anthropic's {"type": "error", ...}.

Handlers raise APIError (or let a RadixServeError through); the exception handlers installed by
`install_error_handlers` pick the format from the route: /v1/messages speaks Anthropic,
everything else OpenAI (the named-caches API included).
"""

from __future__ import annotations

import asyncio
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from radixserve.server.async_engine import EngineDeadError
from radixserve.errors import InvalidRequestError, NotFoundError, PromptTooLongError, RadixServeError

log = logging.getLogger("radixserve.server")

_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
}
_OPENAI_TYPES = {401: "authentication_error", 403: "permission_error", 404: "invalid_request_error",
                 429: "rate_limit_error", 500: "server_error", 503: "server_error"}


class APIError(Exception):
    """An error answered with `status` in the route's API format.

    param and code are OpenAI's optional fields (the offending parameter, a machine-readable
    code such as "model_not_found"); Anthropic's format has no place for them.
    """

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.retry_after = retry_after  # seconds, sent as Retry-After (429)


def is_anthropic_route(path: str) -> bool:
    return path == "/v1/messages" or path.startswith("/v1/messages/")


def error_body(path: str, status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """The JSON body for an error on `path`, in that route's API format."""
    if is_anthropic_route(path):
        kind = _ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
        return {"type": "error", "error": {"type": kind, "message": message}}
    kind = _OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(path: str, status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(path, status, message, param, code), status_code=status, headers=headers)


def validation_message(error: ValidationError | RequestValidationError) -> tuple[str, str | None]:
    """A one-line message for the first pydantic error, and the parameter it is about."""
    errors = error.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    # pydantic adds the union member it tried ("str", "list[...]", "function-after[...]") to loc
    loc = [p for p in loc if not _is_union_tag(p)]
    param = ".".join(loc) or None
    kind = first.get("type", "")
    if kind == "missing":
        message = f"{param}: field required" if param else "a required field is missing"
    elif kind == "extra_forbidden":
        message = f"{param}: unexpected field"
    else:
        text = first.get("msg", "invalid value")
        text = text.removeprefix("Value error, ")
        message = f"{param}: {text}" if param else text
    more = len(errors) - 1
    if more > 0 and kind != "missing":
        message += f" (and {more} more error{'s' if more > 1 else ''})"
    return message, param


def _is_union_tag(part: str) -> bool:
    return part in {"str", "int", "float", "bool", "list", "dict"} or "[" in part or part.startswith("function-")


def install_error_handlers(app: FastAPI) -> None:
    """Map every failure a request can hit to a JSON error in its API's format."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        if exc.retry_after is not None:
            headers = {"Retry-After": str(exc.retry_after)}
        return error_response(request.url.path, exc.status, exc.message, exc.param, exc.code, headers)

    @app.exception_handler(RadixServeError)
    async def _engine_error(request: Request, exc: RadixServeError) -> JSONResponse:
        status, code = _status_of(exc)
        return error_response(request.url.path, status, str(exc), None, code)

    @app.exception_handler(EngineDeadError)
    async def _engine_dead(request: Request, exc: EngineDeadError) -> JSONResponse:
        return error_response(request.url.path, exc.status, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(exc)
        return error_response(request.url.path, 400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message = f"no such endpoint: {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        else:
            message = str(exc.detail)
        return error_response(request.url.path, exc.status_code, message)

    # Not an exception_handler(Exception): Starlette answers those from its outermost
    # middleware and then re-raises, and the server drops the keep-alive connection.
    app.add_middleware(InternalErrorMiddleware)


class InternalErrorMiddleware:
    """Answers an unexpected exception with a 500 in the route's API format and keeps the
    connection open for the client's next request (a bug must not cost a client its socket)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_tracking(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, send_tracking)
        except asyncio.CancelledError:
            # uvicorn cancels the requests still running when --shutdown-timeout runs out: answer
            # them 503 (the engine is stopping) rather than dropping them with a traceback
            if not started:
                response = error_response(scope.get("path", ""), 503, "the server is shutting down; retry")
                await response(scope, receive, send)
        except Exception as exc:  # noqa: BLE001 - the whole point
            path = scope.get("path", "")
            log.exception("unhandled error on %s %s", scope.get("method"), path)
            if started:
                raise  # the response is under way: nothing left to answer with
            response = error_response(path, 500, f"internal server error: {type(exc).__name__}: {exc}")
            await response(scope, receive, send)


def _status_of(exc: RadixServeError) -> tuple[int, str | None]:
    if isinstance(exc, PromptTooLongError):
        return 400, "context_length_exceeded"
    if isinstance(exc, InvalidRequestError):
        return 400, None
    if isinstance(exc, NotFoundError):
        return 404, None
    return 500, None
