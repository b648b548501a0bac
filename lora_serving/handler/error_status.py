"""The HTTP status each engine error (storage errors included) is answered with, for the HTTP server and the DJL
handler alike.

A client's mistake is 400, not LMI's 424 ("Failed Dependency"): the request is what is wrong, and SageMaker
hands the container's status to the caller of InvokeEndpoint either way.
"""

from __future__ import annotations

from http import HTTPStatus

from lora_serving.handler.errors import (
    AdapterCapacityError,
    AdapterExistsError,
    AdapterNotFoundError,
    ConfigError,
    InvalidAdapterError,
    InvalidRequestError,
    LoraNotEnabledError,
)
from lora_serving.handler.storage.errors import (
    BadSourceError,
    SourceAccessDeniedError,
    SourceNotFoundError,
    StorageUnreachableError,
)

# Most specific first: AdapterNotFoundError is also a KeyError, InvalidAdapterError also a ValueError.
_STATUS_BY_ERROR: tuple[tuple[type[Exception], HTTPStatus], ...] = (
    (AdapterNotFoundError, HTTPStatus.NOT_FOUND),
    (AdapterExistsError, HTTPStatus.CONFLICT),
    (AdapterCapacityError, HTTPStatus.INSUFFICIENT_STORAGE),
    (InvalidAdapterError, HTTPStatus.BAD_REQUEST),
    (LoraNotEnabledError, HTTPStatus.BAD_REQUEST),
    (InvalidRequestError, HTTPStatus.BAD_REQUEST),
    (ConfigError, HTTPStatus.BAD_REQUEST),
    # docs/STORAGE.md; any other StorageError is 500.
    (SourceNotFoundError, HTTPStatus.NOT_FOUND),
    (SourceAccessDeniedError, HTTPStatus.FORBIDDEN),
    (StorageUnreachableError, HTTPStatus.SERVICE_UNAVAILABLE),
    (BadSourceError, HTTPStatus.BAD_REQUEST),
)


def engine_error_status(error: Exception) -> int:
    """400/404/409/507 for the errors a caller can act on; 500 for anything else."""
    for error_class, status in _STATUS_BY_ERROR:
        if isinstance(error, error_class):
            return status
    return HTTPStatus.INTERNAL_SERVER_ERROR
