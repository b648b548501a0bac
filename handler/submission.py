"""Adding a front end's prompt to the engine: the one place where an unregistered adapter named by a
generation request becomes a bad argument (400, `Adapter X is not registered`). The management routes
keep AdapterNotFoundError's 404, where the adapter is the resource asked for."""

from __future__ import annotations

from handler.engine import Engine
from handler.errors import AdapterNotFoundError, InvalidRequestError
from handler.sequence import SamplingParams


def add_prompt(engine: Engine, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
               adapter: str | None) -> None:
    try:
        engine.add_request(request_id, prompt_token_ids, params, adapter)
    except AdapterNotFoundError as error:
        raise InvalidRequestError(str(error)) from None
