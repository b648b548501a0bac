"""DJL Serving's entry point (SPEC section 5): `option.entryPoint=lora_serving.handler.model` lets the official LMI /
DJL container run this engine through its Python worker (`djl_python_engine.py`).

The worker calls `handle(inputs)` first with the model's properties and no content (the engine starts),
then with requests, and `register_adapter` / `update_adapter` / `unregister_adapter` for DJL's adapter
management API (and for every `<model_dir>/adapters/*` at start-up). DJL picks the mode from the
properties (handler.djl.services):

- rolling batch (`option.rolling_batch` set and not `disable`): one call per iteration of DJL's loop;
- plain batching: one call per batch of new requests, answered whole;
- async (`option.async_mode=true`, what LMI makes of `rolling_batch=auto` in its vLLM container): the
  worker awaits each call on its event loop, so these functions return coroutines there.

Which form to answer in is decided per call: inside the worker's running event loop (async mode) the
functions return awaitables, elsewhere Outputs. Importing this module leaves logging alone; the handler
package sets OMP_WAIT_POLICY=PASSIVE unless the environment sets it (handler/__init__.py): spinning OpenMP
workers took the CPU from DJL's threads between rolling-batch iterations.
"""

from __future__ import annotations

import asyncio

from djl_python import Output

from lora_serving.handler.djl.adapters import DjlAdapters
from lora_serving.handler.djl.services import AsyncService, SyncService

_service: SyncService | AsyncService | None = None


def handle(inputs):
    if _in_event_loop():
        return _handle_async(inputs)
    global _service
    if _service is None:
        _service = SyncService(inputs.get_properties())
    return _service.handle(inputs)


def register_adapter(inputs):
    return _adapter_call(DjlAdapters.register, inputs, loads_files=True)


def update_adapter(inputs):
    return _adapter_call(DjlAdapters.update, inputs, loads_files=True)


def unregister_adapter(inputs):
    return _adapter_call(DjlAdapters.unregister, inputs, loads_files=False)


async def _handle_async(inputs):
    global _service
    if _service is None:
        _service = await AsyncService.start(inputs.get_properties())
    return await _service.handle(inputs)


def _adapter_call(action, inputs, *, loads_files: bool):
    if _in_event_loop():
        return _adapter_call_async(action, inputs, loads_files)
    if _service is None:
        return _not_started()
    return _service.adapter_call(action, inputs)


async def _adapter_call_async(action, inputs, loads_files: bool):
    if _service is None:
        return _not_started()
    return await _service.adapter_call(action, inputs, loads_files=loads_files)


def _not_started() -> Output:
    return Output().error("the model is not initialised yet", code=503, message="the model is not initialised yet")


def _in_event_loop() -> bool:
    """True when called from a running asyncio loop: DJL's async engine awaits what the handler returns."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True
