"""Talking to S3: s3:// URLs, a client that fails fast, listing, and one object to one file.

Endpoints and credentials come from boto3's own settings (the default credential chain,
AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, AWS_REGION, ~/.aws/config); nothing here adds another.
Every botocore failure leaves this module as a StorageError subclass naming the s3:// location.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import boto3
import botocore.config
import botocore.exceptions
import s3transfer.exceptions

from lora_serving.handler.storage.errors import (
    BadSourceError,
    SourceAccessDeniedError,
    SourceNotFoundError,
    StorageError,
    StorageUnreachableError,
)

S3_SCHEME = "s3://"

# A dead endpoint must fail start-up within tens of seconds rather than hang: a few attempts,
# each bounded by the connect timeout. The read timeout bounds one socket read, not a whole
# transfer, so it does not limit the size of what can be downloaded.
DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_CONNECT_TIMEOUT_S = 5.0
DEFAULT_READ_TIMEOUT_S = 60.0

# Marks the temporary name an object is downloaded under, so leftovers of an interrupted
# download can be recognised and removed.
DOWNLOADING_INFIX = ".downloading-"

_ACCESS_DENIED_CODES = frozenset(
    {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"}
)


@dataclass(frozen=True)
class S3Url:
    bucket: str
    key: str  # "" names the whole bucket

    def __str__(self) -> str:
        return f"{S3_SCHEME}{self.bucket}/{self.key}"

    def as_prefix(self) -> S3Url:
        """The URL read as a directory: `s3://b/models/x` and `s3://b/models/x/` both list `models/x/`,
        never the sibling `models/x-old/`."""
        if self.key == "" or self.key.endswith("/"):
            return self
        return S3Url(self.bucket, self.key + "/")


@dataclass(frozen=True)
class S3Object:
    key: str
    size: int
    etag: str  # without the quotes S3 puts around it


def is_s3_url(value: str) -> bool:
    return value.startswith(S3_SCHEME)


def parse_s3_url(url: str) -> S3Url:
    if not is_s3_url(url):
        raise BadSourceError(f"{url!r} is not an s3:// URL")
    bucket, _, key = url[len(S3_SCHEME) :].partition("/")
    if not bucket:
        raise BadSourceError(f"{url!r} names no bucket")
    return S3Url(bucket, key)


def make_s3_client(
    *,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S,
    read_timeout: float = DEFAULT_READ_TIMEOUT_S,
):
    """An S3 client with bounded retries and timeouts. It is thread-safe and may be shared.

    `max_attempts` counts every attempt of a request, the first one included."""
    config = botocore.config.Config(
        retries={"mode": "standard", "total_max_attempts": max_attempts},
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
    )
    # A session of its own: creating clients from boto3's default session is not thread-safe.
    return boto3.session.Session().client("s3", config=config)


@contextlib.contextmanager
def s3_errors_as_storage_errors(client, location: S3Url) -> Iterator[None]:
    """Re-raise botocore and s3transfer failures as StorageError subclasses naming `location`."""
    endpoint = client.meta.endpoint_url
    attempts = (client.meta.config.retries or {}).get("total_max_attempts", "several")
    try:
        yield
    except botocore.exceptions.ClientError as error:
        raise _client_error_as_storage_error(error, location, endpoint) from error
    except (botocore.exceptions.NoCredentialsError, botocore.exceptions.PartialCredentialsError) as error:
        raise SourceAccessDeniedError(f"cannot read {location}: no usable AWS credentials ({error})") from error
    except botocore.exceptions.ParamValidationError as error:
        raise BadSourceError(f"invalid S3 location {location}: {error}") from error
    except (
        botocore.exceptions.ConnectionError,
        botocore.exceptions.HTTPClientError,
        s3transfer.exceptions.RetriesExceededError,
    ) as error:
        raise StorageUnreachableError(
            f"cannot reach S3 at {endpoint} for {location} after {attempts} attempts: {error}"
        ) from error
    except botocore.exceptions.BotoCoreError as error:
        raise StorageError(f"S3 request for {location} at {endpoint} failed: {error}") from error


def _client_error_as_storage_error(
    error: botocore.exceptions.ClientError, location: S3Url, endpoint: str
) -> StorageError:
    code = error.response.get("Error", {}).get("Code", "")
    message = error.response.get("Error", {}).get("Message", "")
    status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    retries = error.response.get("ResponseMetadata", {}).get("RetryAttempts", 0)
    answer = f"{code or 'error'} (HTTP {status}): {message}"
    if code == "NoSuchBucket":
        return SourceNotFoundError(f"S3 bucket {location.bucket!r} does not exist ({location})")
    if status == 404 or code in ("NoSuchKey", "NotFound"):
        # HEAD answers a bare 404 for a missing key and for a missing bucket alike.
        return SourceNotFoundError(f"{location} does not exist (no such bucket or key): {answer}")
    if status == 403 or code in _ACCESS_DENIED_CODES:
        return SourceAccessDeniedError(f"S3 denied access to {location}: {answer}")
    if status is None or status >= 500 or code in ("SlowDown", "RequestTimeout"):
        return StorageUnreachableError(f"S3 at {endpoint} kept failing for {location} ({retries} retries): {answer}")
    return StorageError(f"S3 at {endpoint} refused the request for {location}: {answer}")


def list_s3_prefix(client, prefix: S3Url) -> list[S3Object]:
    """Every object under `prefix` (a directory-style URL); SourceNotFoundError when there is none."""
    objects = []
    with s3_errors_as_storage_errors(client, prefix):
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=prefix.bucket, Prefix=prefix.key)
        for page in pages:
            for item in page.get("Contents", []):
                # Zero-byte "folder" markers made by the S3 console are not files.
                if not item["Key"].endswith("/"):
                    objects.append(S3Object(item["Key"], item["Size"], item["ETag"].strip('"')))
    if not objects:
        raise SourceNotFoundError(f"no objects under {prefix}")
    return objects


def head_s3_object(client, location: S3Url) -> S3Object:
    with s3_errors_as_storage_errors(client, location):
        answer = client.head_object(Bucket=location.bucket, Key=location.key)
    return S3Object(location.key, answer["ContentLength"], answer["ETag"].strip('"'))


def download_s3_object_to_file(client, bucket: str, obj: S3Object, destination: Path) -> None:
    """Download `obj` to `destination` through a temporary name beside it, renamed into place only
    once complete, so a crash never leaves a partial file under the final name."""
    location = S3Url(bucket, obj.key)
    partial = destination.with_name(f".{destination.name}{DOWNLOADING_INFIX}{secrets.token_hex(4)}")
    destination.parent.mkdir(parents=True, exist_ok=True)
    try:
        with s3_errors_as_storage_errors(client, location):
            client.download_file(bucket, obj.key, str(partial))
        downloaded_size = partial.stat().st_size
        if downloaded_size != obj.size:
            raise StorageError(
                f"{location} changed while downloading: listed as {obj.size} bytes, got {downloaded_size}"
            )
        partial.replace(destination)
    finally:
        partial.unlink(missing_ok=True)
