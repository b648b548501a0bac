"""Errors raised by the storage side (S3 downloads, archive unpacking, adapter sources).

Engine errors like any other (the server and the DJL handler answer them alike), and the classes follow what
a caller has to be answered, so that handler/error_status.py maps them by class alone:

    StorageError                  anything else that went wrong while fetching or unpacking
      SourceNotFoundError         404: no such bucket, key, prefix or local path
      SourceAccessDeniedError     403: S3 refused our credentials, or there are none
      StorageUnreachableError     503: S3 could not be reached or kept failing after retries
      BadSourceError              400: the source itself is unacceptable
        UnsafeSourceError           a path, key or archive entry that could escape its directory,
                                    a link or device, a local path outside the allowed roots
        ArchiveTooLargeError        an archive over the unpacked size or entry count bound
        CorruptArchiveError         a truncated or corrupt gzip / tar
        InvalidAdapterError         a bad adapter name, or a directory without adapter files

Every message names the bucket/key, path or archive entry and says what is wrong with it.
"""

from lora_serving.handler.errors import EngineError


class StorageError(EngineError):
    """Base of every storage failure."""


class SourceNotFoundError(StorageError):
    """The bucket, key, prefix or local path does not exist."""


class SourceAccessDeniedError(StorageError):
    """S3 denied access, or no AWS credentials were found."""


class StorageUnreachableError(StorageError):
    """S3 could not be reached, timed out, or kept answering errors after bounded retries."""


class BadSourceError(StorageError):
    """The source is unacceptable as given; retrying will not help."""


class UnsafeSourceError(BadSourceError):
    """Refused because it could write or read outside the place it belongs."""


class ArchiveTooLargeError(BadSourceError):
    """An archive unpacks to more bytes or entries than the configured bound."""


class CorruptArchiveError(BadSourceError):
    """A truncated, corrupt or non-tar archive."""


class InvalidAdapterError(BadSourceError):
    """A bad adapter name, or a source that does not hold a LoRA adapter."""
