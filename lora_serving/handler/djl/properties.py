"""DJL's init call: its properties to an engine Config, and the mode DJL runs the worker in.

DJL passes the model's `option.*` keys without the prefix, and adds keys of its own: `model_dir` (the
model directory; where DJL downloaded an `s3://` model), `device_id` (-1 for the CPU), `handler`, and the
settings it reads itself (`entryPoint`, `async_mode`, ...). LMI's recommender adds a few more
(`pipeline_parallel_degree`, `mpi_mode`, `is_peft_model`). A Hugging Face Hub model_id is fetched here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from lora_serving.handler.config import Config
from lora_serving.handler.errors import ConfigError
from lora_serving.handler.hub import HubSettings, fetch_model_for, is_hub_id

# Keys DJL or LMI set for themselves: not engine options, and not worth a warning.
DJL_KEYS = frozenset({
    "model_dir", "device_id", "handler", "entryPoint", "async_mode", "mpi_mode", "pipeline_parallel_degree",
    "cluster_size", "is_peft_model", "predict_timeout", "model_loading_timeout", "parallel_loading",
    "pythonExecutable", "enable_venv", "env", "recommended_entry_point", "use_passive_workers",
    "log_request_metric", "metrics_aggregation", "max_num_tokens", "output_formatter_class",
})


def is_rolling_batch(properties: dict[str, str]) -> bool:
    """PyProcess.java's test: rolling batch unless `rolling_batch` is absent or `disable`."""
    return properties.get("rolling_batch") not in (None, "disable")


def engine_config(properties: dict[str, str], env: Mapping[str, str] | None = None) -> Config:
    """`env`: where the Hub settings (HF_TOKEN, HF_ENDPOINT, ...) come from; the process's by default."""
    # DJL may also put a model.py's @input_formatter / @output_formatter function here: not options.
    values = {key: value for key, value in properties.items() if key not in DJL_KEYS and isinstance(value, str)}
    model_id = values.get("model_id", "")
    if is_hub_id(model_id) and not Path(model_id).is_dir():
        # DJL itself downloads only s3:// models; a Hub id is ours to fetch, as LMI's handlers do.
        values["model_id"] = str(fetch_model_for(Config.from_options(**values),
                                                      HubSettings.from_env(os.environ if env is None else env)))
    elif not Path(model_id).is_dir():
        # DJL downloads an s3:// model into model_dir before the first call.
        model_dir = properties.get("model_dir", "")
        if not (Path(model_dir) / "config.json").is_file():
            raise ConfigError("model_id", model_id, f"is not a local model directory or a Hugging Face Hub id "
                              f"(org/name), and the model directory DJL gave ({model_dir}) has no config.json")
        values["model_id"] = model_dir
    if "device" not in values and properties.get("device_id") is not None:
        device_id = int(properties["device_id"])
        values["device"] = "cpu" if device_id < 0 else f"cuda:{device_id}"
    return Config.from_options(**values)
