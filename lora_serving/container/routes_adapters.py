"""Adapter management, in DJL's form and SageMaker's.

DJL (query parameters; the `/models/{model}` prefix may be dropped, there is one model):
    GET    /models/{m}/adapters[?limit=&next_page_token=]
    POST   /models/{m}/adapters?name=&src=[&preload=][&pin=]
    GET    /models/{m}/adapters/{a}
    POST   /models/{m}/adapters/{a}/update[?src=][&pin=]
    DELETE /models/{m}/adapters/{a}
SageMaker adapter inference components: `POST /adapters` with a JSON body `{"name", "src", "preload", "pin"}`
(the route DJL's prefix-less register uses too: a JSON body wins over query parameters) and
`DELETE /adapters/{name}`.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from lora_serving.container.runtime import read_body, require_runtime
from lora_serving.handler.api.validation import parse_json, validate_model
from lora_serving.handler.api.sagemaker import adapter_registered, adapter_unregistered, adapter_updated

router = APIRouter()


class AdapterRegistration(BaseModel):
    """SageMaker's register body (and DJL's query parameters): `src` a local path or an s3:// url."""

    model_config = ConfigDict(extra="ignore")

    name: str
    src: str
    preload: bool = True
    pin: bool = False

    @field_validator("name", "src")
    @classmethod
    def _not_empty(cls, value: str, info) -> str:
        if not value:
            raise ValueError(f"the parameter {info.field_name} cannot be an empty string")
        return value


class AdapterUpdate(BaseModel):
    model_config = ConfigDict(extra="ignore")

    src: str | None = None
    pin: bool | None = None
    # The engine loads adapters when a request needs them; accepted for DJL compatibility.
    preload: bool | None = None


class ListPage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    limit: int = Field(default=100, ge=1)
    next_page_token: int = Field(default=0, ge=0)


async def list_adapters(request: Request) -> JSONResponse:
    runtime = require_runtime(request)
    page = validate_model(ListPage, dict(request.query_params), "query")
    adapters = await asyncio.to_thread(runtime.adapters.list)
    end = page.next_page_token + page.limit
    body: dict = {"adapters": adapters[page.next_page_token:end]}
    if end < len(adapters):
        body["nextPageToken"] = str(end)
    return JSONResponse(body)


async def register_adapter(request: Request) -> JSONResponse:
    runtime = require_runtime(request)
    body = await read_body(request)
    arguments = parse_json(body) if body.strip() else dict(request.query_params)
    registration = validate_model(AdapterRegistration, arguments)
    await asyncio.to_thread(runtime.adapters.register, registration.name, registration.src,
                            preload=registration.preload, pin=registration.pin)
    return JSONResponse({"status": adapter_registered(registration.name)})


async def describe_adapter(request: Request) -> JSONResponse:
    runtime = require_runtime(request)
    description = await asyncio.to_thread(runtime.adapters.describe, request.path_params["adapter_name"])
    return JSONResponse([description])  # DJL's describe answers a list


async def update_adapter(request: Request) -> JSONResponse:
    runtime = require_runtime(request)
    name = request.path_params["adapter_name"]
    update = validate_model(AdapterUpdate, dict(request.query_params), "query")
    await asyncio.to_thread(runtime.adapters.update, name, src=update.src, pin=update.pin)
    return JSONResponse({"status": adapter_updated(name)})


async def unregister_adapter(request: Request) -> JSONResponse:
    runtime = require_runtime(request)
    name = request.path_params["adapter_name"]
    await asyncio.to_thread(runtime.adapters.unregister, name)
    return JSONResponse({"status": adapter_unregistered(name)})


for prefix in ("", "/models/{model_name}"):
    router.add_api_route(f"{prefix}/adapters", list_adapters, methods=["GET"])
    router.add_api_route(f"{prefix}/adapters", register_adapter, methods=["POST"])
    router.add_api_route(f"{prefix}/adapters/{{adapter_name}}", describe_adapter, methods=["GET"])
    router.add_api_route(f"{prefix}/adapters/{{adapter_name}}/update", update_adapter, methods=["POST"])
    router.add_api_route(f"{prefix}/adapters/{{adapter_name}}", unregister_adapter, methods=["DELETE"])
