"""DJL Serving's wire format between its Java front end and the Python worker, as Connection.java and
CodecUtils.java write and read it, and the per-request item Request.java decodes.

Input (Java -> Python): short property count, then (utf8 key, utf8 value) pairs; short content count, then
(utf8 key, int length, bytes). A utf8 string is an int byte length (-1 for null) and its UTF-8 bytes.
Output (Python -> Java): short code, utf8 message, short property count and pairs, short content count and
(utf8 key, bytes) items; a content count of -1 starts a stream of chunks, each a byte (1: more follow,
0: the last) and bytes.
An item of a rolling batch or an async answer is a map written with `Output.binary_encode`: short count,
then (utf8 key, utf8 value) pairs; Request.addResponse reads `data`, `last`, `code` and `error` from it.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field


def _utf8(value: str | None) -> bytes:
    if value is None:
        return struct.pack(">i", -1)
    data = value.encode("utf-8")
    return struct.pack(">i", len(data)) + data


def encode_input(properties: dict[str, str | None], content: list[tuple[str, bytes]]) -> bytes:
    """RequestEncoder.encode."""
    message = bytearray(struct.pack(">h", len(properties)))
    for key, value in properties.items():
        message += _utf8(key) + _utf8(value)
    message += struct.pack(">h", len(content))
    for key, data in content:
        message += _utf8(key) + struct.pack(">i", len(data)) + data
    return bytes(message)


@dataclass
class WorkerOutput:
    """ai.djl.modality.Output as OutputDecoder builds it."""

    code: int
    message: str | None
    properties: dict[str, str | None] = field(default_factory=dict)
    content: list[tuple[str | None, bytes]] = field(default_factory=list)
    chunks: list[bytes] | None = None  # a streamed Output's chunks (contentSize -1)
    stream_done: bool = False


class _Reader:
    def __init__(self, buffer: bytes) -> None:
        self.buffer = buffer
        self.offset = 0

    def take(self, size: int) -> bytes:
        if self.offset + size > len(self.buffer):
            raise IndexError("incomplete frame")  # OutputDecoder waits for more bytes, as here
        data = self.buffer[self.offset:self.offset + size]
        self.offset += size
        return data

    def short(self) -> int:
        return struct.unpack(">h", self.take(2))[0]

    def int(self) -> int:
        return struct.unpack(">i", self.take(4))[0]

    def utf8(self) -> str | None:
        length = self.int()
        return None if length < 0 else self.take(length).decode("utf-8")

    def bytes(self) -> bytes | None:
        length = self.int()
        return None if length < 0 else self.take(length)


class OutputDecoder:
    """OutputDecoder.decode: feed it what the socket read, get back every Output completed by it. A
    streamed Output is returned at its header; its chunks are appended to it as they arrive."""

    def __init__(self) -> None:
        self._pending = b""
        self._streaming: WorkerOutput | None = None

    def feed(self, data: bytes) -> list[WorkerOutput]:
        self._pending += data
        outputs = []
        while True:
            reader = _Reader(self._pending)
            try:
                output = self._decode_one(reader)
            except IndexError:
                return outputs
            self._pending = self._pending[reader.offset:]
            if output is not None:
                outputs.append(output)

    def _decode_one(self, reader: _Reader) -> WorkerOutput | None:
        if self._streaming is not None:
            more = reader.take(1) == b"\x01"
            chunk = reader.bytes() or b""
            self._streaming.chunks.append(chunk)
            if not more:
                self._streaming.stream_done = True
                self._streaming = None
            return None
        output = WorkerOutput(code=reader.short(), message=reader.utf8())
        for _ in range(reader.short()):
            key = reader.utf8()
            output.properties[key] = reader.utf8()
        content_size = reader.short()
        if content_size == -1:
            output.chunks = []
            self._streaming = output
        else:
            for _ in range(content_size):
                key = reader.utf8()
                output.content.append((key, reader.bytes() or b""))
        return output


def decode_item(data: bytes) -> dict[str, str]:
    """The map Request.addResponse reads from one rolling-batch or async item."""
    reader = _Reader(data)
    item = {}
    for _ in range(reader.short()):
        key = reader.utf8()
        value = reader.utf8()
        if key is None or value is None:
            raise ValueError("Request.addResponse requires non-null keys and values (Objects.requireNonNull)")
        item[key] = value
    if reader.offset != len(data):
        raise ValueError(f"{len(data) - reader.offset} bytes after the item's map")
    return item
