"""Every error a route can raise, answered as JSON that names the problem, in the shape its API's clients
parse: OpenAI's `{"error": {"message", "type", ...}}` under /v1/, TGI's `{"error", "error_type"}` on the
TGI routes, and LMI's `{"error", "code"}` everywhere else.
"""

from __future__ import annotations

import logging
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lora_serving.handler.error_status import engine_error_status
from lora_serving.handler.errors import EngineError

logger = logging.getLogger(__name__)

TGI_PATHS = ("/", "/generate", "/generate_stream")


class ServiceUnavailableError(Exception):
    """The model is not loaded yet (or failed to load): answered 503, which SageMaker retries."""


class PayloadTooLargeError(Exception):
    """A request body over the server's bound: answered 413."""


def error_response(request: Request, status: int, message: str) -> JSONResponse:
    path = request.url.path
    if path.startswith("/v1/"):
        body = {"error": {"message": message, "type": _openai_error_type(status), "param": None, "code": status}}
    elif path in TGI_PATHS:
        body = {"error": message, "error_type": _tgi_error_type(status)}
    else:
        body = {"error": message, "code": status}
    return JSONResponse(body, status_code=status)


def _tgi_error_type(status: int) -> str:
    if status == HTTPStatus.TOO_MANY_REQUESTS:
        return "overloaded"
    return "validation" if status < 500 else "generation"


def _openai_error_type(status: int) -> str:
    if status == HTTPStatus.NOT_FOUND:
        return "not_found_error"
    return "invalid_request_error" if status < 500 else "server_error"


def install_error_handlers(app: FastAPI) -> None:
    async def on_engine_error(request: Request, error: EngineError) -> JSONResponse:
        status = engine_error_status(error)
        if status >= 500:
            logger.error("%s %s failed: %s", request.method, request.url.path, error)
        return error_response(request, status, str(error))

    async def on_unavailable(request: Request, error: ServiceUnavailableError) -> JSONResponse:
        return error_response(request, HTTPStatus.SERVICE_UNAVAILABLE, str(error))

    async def on_too_large(request: Request, error: PayloadTooLargeError) -> JSONResponse:
        return error_response(request, HTTPStatus.REQUEST_ENTITY_TOO_LARGE, str(error))

    async def on_unexpected(request: Request, error: Exception) -> JSONResponse:
        # A bug, not the client's fault: the details go to the log, the client gets JSON like every answer.
        logger.error("%s %s failed", request.method, request.url.path, exc_info=error)
        return error_response(request, HTTPStatus.INTERNAL_SERVER_ERROR,
                              f"internal error ({type(error).__name__}); the server logged the details")

    async def on_validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in detail['loc'])}: {detail['msg']}" for detail in error.errors()
        )
        return error_response(request, HTTPStatus.BAD_REQUEST, problems)

    async def on_http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        message = error.detail if isinstance(error.detail, str) else HTTPStatus(error.status_code).phrase
        if error.status_code == HTTPStatus.NOT_FOUND and message == "Not Found":
            message = f"no route {request.method} {request.url.path}"
        return error_response(request, error.status_code, message)

    app.add_exception_handler(EngineError, on_engine_error)
    app.add_exception_handler(ServiceUnavailableError, on_unavailable)
    app.add_exception_handler(PayloadTooLargeError, on_too_large)
    app.add_exception_handler(Exception, on_unexpected)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
