"""The FastAPI application: routes, error answers, request counting, and the start-up thread.

The server listens at once and loads the model in a thread, so that SageMaker's /ping polls get 503
until the engine steps (SPEC section 2). If loading fails, `on_startup_failure` is called (the entry point
stops the server and exits non-zero) and /ping keeps answering 503 with the reason; so too if the engine
stops for good later (a tensor-parallel rank died: `ServerState.engine_error` names it).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI

from lora_serving.container import routes_adapters, routes_metrics, routes_openai, routes_sagemaker, routes_tgi
from lora_serving.container.http_errors import install_error_handlers
from lora_serving.container.overload import OverloadGate
from lora_serving.container.routes_metrics import RequestCountMiddleware
from lora_serving.container.runtime import ServerState
from lora_serving.container.startup import load_runtime

logger = logging.getLogger(__name__)


def create_app(model_dir: Path, env: Mapping[str, str],
               on_startup_failure: Callable[[], None] = lambda: None) -> FastAPI:
    state = ServerState()

    def engine_failed(message: str) -> None:
        state.engine_error = message
        on_startup_failure()

    def load(event_loop: asyncio.AbstractEventLoop) -> None:
        try:
            state.runtime = load_runtime(model_dir, env, event_loop, state.metrics, on_fatal_error=engine_failed)
            logger.info("ready: serving %s", state.runtime.config.model_id)
        except Exception as error:
            logger.exception("start-up failed")
            state.startup_error = f"start-up failed: {error}"
            on_startup_failure()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        threading.Thread(target=load, args=(asyncio.get_running_loop(),), name="startup", daemon=True).start()
        try:
            yield
        finally:
            if state.runtime is not None:
                state.runtime.engine_loop.stop()
                if state.runtime.resolver is not None:
                    state.runtime.resolver.close()
                state.runtime.engine.close()

    app = FastAPI(title="LoRA serving (SageMaker LMI compatible)", lifespan=lifespan)
    app.state.server = state
    install_error_handlers(app)
    app.add_middleware(RequestCountMiddleware, metrics=state.metrics)
    # Outermost: an overloaded server answers before anything else runs.
    app.add_middleware(OverloadGate, state=state)
    for module in (routes_sagemaker, routes_adapters, routes_openai, routes_tgi, routes_metrics):
        app.include_router(module.router)
    return app
