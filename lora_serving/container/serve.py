"""The process entry point: `python -m lora_serving [--model-dir DIR] [--host H] [--port P]`.

Defaults are SageMaker's: the model in /opt/ml/model, all interfaces, port 8080 or
$SAGEMAKER_BIND_TO_PORT. Exits non-zero, with the reason logged, if the model cannot be loaded.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import uvicorn

from lora_serving.container.app import create_app

DEFAULT_MODEL_DIR = "/opt/ml/model"
DEFAULT_PORT = 8080


def parse_args(argv: list[str] | None, env: dict[str, str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lora_serving", description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=Path(DEFAULT_MODEL_DIR),
                        help="the model directory: serving.properties, model files, adapters (default %(default)s)")
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default %(default)s)")
    parser.add_argument("--port", type=int, default=int(env.get("SAGEMAKER_BIND_TO_PORT", DEFAULT_PORT)),
                        help=f"port (default $SAGEMAKER_BIND_TO_PORT or {DEFAULT_PORT})")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    env = dict(os.environ)
    args = parse_args(argv, env)
    logging.basicConfig(level=env.get("LOG_LEVEL", "INFO").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server: uvicorn.Server | None = None

    def stop_server() -> None:
        server.should_exit = True

    app = create_app(args.model_dir, env, on_startup_failure=stop_server)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_config=None,
                                           timeout_graceful_shutdown=5))
    server.run()
    state = app.state.server
    if state.engine_error:
        logging.getLogger("lora_serving.container").critical("exiting: %s", state.engine_error)
    return 1 if state.startup_error or state.engine_error else 0
