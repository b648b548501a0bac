"""The names SageMaker's LoRA API puts on the wire (adapter headers, management answers), shared by the HTTP
server and the DJL handler.

Kept here rather than imported from `model-hosting-container-standards`: importing that package raises the
root logger to ERROR, which silenced the DJL worker's "Python engine started." line (and our own logs).
"""

from __future__ import annotations

# The adapter for one inference request; wins over the body's "adapters" (SPEC section 3).
ADAPTER_IDENTIFIER_HEADER = "X-Amzn-SageMaker-Adapter-Identifier"
# The name a client knows the adapter by, where it differs from the registered name.
ADAPTER_ALIAS_HEADER = "X-Amzn-SageMaker-Adapter-Alias"


def adapter_registered(alias: str) -> str:
    return f"Adapter {alias} registered"


def adapter_updated(alias: str) -> str:
    return f"Adapter {alias} updated"


def adapter_unregistered(alias: str) -> str:
    return f"Adapter {alias} unregistered"
