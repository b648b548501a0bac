"""Turning names from untrusted sources (S3 keys, archive entries) into paths that stay inside
the directory they are joined to."""


class UnsafeNameError(ValueError):
    """The name could reach outside its directory; the message says why, the caller says where."""


def relative_parts(name: str) -> tuple[str, ...]:
    """The components of a '/'-separated relative name, without '.' and empty components.

    Refuses absolute names and any '..' component rather than normalising them away: a name
    that tries to climb out is hostile or broken, and either way must not be unpacked.
    """
    if name.startswith("/"):
        raise UnsafeNameError("absolute path")
    parts = tuple(part for part in name.split("/") if part not in ("", "."))
    if ".." in parts:
        raise UnsafeNameError("'..' path component")
    return parts
