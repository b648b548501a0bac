"""djl_python Outputs in the shapes DJL's Java front end reads.

- Rolling batch (RollingBatch.java): one content item per request of the iteration, in batch order, each
  the `Output.binary_encode`d {data, last[, code, error]} map, and its headers as `batch_<i>_<name>`
  properties.
- Async mode (AsyncRequestManager.java, djl_python's async_utils): one Output per answer piece, holding
  one such map; the worker adds the request's `request_tracking_id`.
- Plain batching (PyPredictor.java): the whole answer of each request as its content, `data` for a
  request sent alone, `batch_<i>.data` for each request of a batch.
"""

from __future__ import annotations

import json

from djl_python import Output

from lora_serving.handler.djl.request import JSON, Item


def item_bytes(item: Item) -> bytes:
    return bytes(Output.binary_encode(item.as_map()))


def rolling_batch_output(items: list[tuple[Item, dict[str, str]]]) -> Output:
    """One iteration's answer: (item, headers) per request, in the order of the batch."""
    output = Output()
    for index, (item, headers) in enumerate(items):
        output.add(item_bytes(item), key="data", batch_index=index)
        for name, value in headers.items():
            output.add_property(f"batch_{index}_{name}", value)
    return output


def async_output(item: Item, content_type: str) -> Output:
    output = Output()
    output.add_property("Content-Type", content_type)
    output.add(item_bytes(item))
    return output


def whole_output(items: list[tuple[Item, str]], batched: bool) -> Output:
    """Plain batching: (finished item, content type) per request. A request sent alone that failed is an
    error Output (its code is the HTTP status); a failed request of a batch answers {"code", "error"}, the
    batch's status being shared by all its requests."""
    if not batched:
        item, content_type = items[0]
        if item.code is not None:
            return Output().error(item.error, code=item.code, message=item.error)
        return Output().add(item.data, key="data").add_property("Content-Type", content_type)
    output = Output()
    content_types = set()
    for index, (item, content_type) in enumerate(items):
        if item.code is not None:
            data, content_type = json.dumps({"code": item.code, "error": item.error}), JSON
        else:
            data = item.data
        output.add(data, key="data", batch_index=index)
        output.add_property(f"batch_{index}_Content-Type", content_type)
        content_types.add(content_type)
    if len(content_types) == 1:
        # PyPredictor gives every request of the batch the batch's properties: a shared type is the header.
        output.add_property("Content-Type", content_types.pop())
    return output
