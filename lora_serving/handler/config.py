"""One Config for the whole container, built from serving.properties, OPTION_* environment and keywords.

LMI users already have `serving.properties` files and SageMaker environments; every value they write
must be accepted as they write it (SPEC section 1). Unknown keys are logged, not fatal; a bad value is a
startup error that names the key.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from lora_serving.handler.errors import ConfigError
from lora_serving.handler.reasoning_parsers import REASONING_PARSERS
from lora_serving.handler.tool_parsers import TOOL_CALL_PARSERS

logger = logging.getLogger(__name__)

PROPERTIES_FILE = "serving.properties"
# Where downloads are cached when option.cache_dir is not set.
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "lora-serving"

# Environment variables SageMaker and LMI users set, mapped onto option keys.
ENV_ALIASES = {
    "HF_MODEL_ID": "model_id",
    "SM_NUM_GPUS": "tensor_parallel_degree",
    "MAX_BATCH_SIZE": "max_rolling_batch_size",
    "CUDA_MEMORY_FRACTION": "gpu_memory_utilization",
}

# Every rolling-batch backend name LMI accepts selects our engine.
ROLLING_BATCH_NAMES = {"auto", "lmi-dist", "vllm", "scheduler", "trtllm", "disable"}
DTYPE_NAMES = {
    "auto": "auto",
    "fp16": "float16",
    "float16": "float16",
    "half": "float16",
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp32": "float32",
    "float32": "float32",
    "float": "float32",
}
OUTPUT_FORMATTERS = {"json", "jsonlines", "sse"}
# tensor_parallel_degree=max: every visible GPU (the engine counts them); on a CPU, 1.
TENSOR_PARALLEL_MAX = -1
# Keys of serving.properties outside the option.* namespace that LMI defines.
TOP_LEVEL_KEYS = {"engine", "job_queue_size"}


@dataclass(slots=True)
class Config:
    """Every setting of the container. Field names are the `option.*` keys without the prefix."""

    # A local directory, an s3:// prefix, or a Hugging Face Hub id (org/name; handler/hub.py).
    model_id: str = ""
    # The Hub revision (branch, tag or commit) of a Hub model_id; "" is the repo's default branch.
    revision: str = ""
    engine: str = "Python"
    rolling_batch: str = "auto"
    max_rolling_batch_size: int = 32
    # Ranks the model is sharded over (handler/tp/); TENSOR_PARALLEL_MAX ("max"): every visible GPU, 1 on a CPU.
    tensor_parallel_degree: int = 1
    dtype: str = "auto"
    enable_lora: bool = False
    max_loras: int = 4
    max_lora_rank: int = 16
    # None means "same as max_loras", LMI's default.
    max_cpu_loras: int | None = None
    lora_extra_vocab_size: int = 256
    gpu_memory_utilization: float = 0.9
    # None means the model's max_position_embeddings.
    max_model_len: int | None = None
    output_formatter: str = "json"
    trust_remote_code: bool = False
    # OpenAI tool calling with tool_choice "auto" (handler/tool_parsers/: hermes, qwen, llama3_json, mistral),
    # and the parser that moves a reasoning model's thinking into reasoning_content (qwen3, deepseek_r1).
    enable_auto_tool_choice: bool = False
    tool_call_parser: str = ""
    reasoning_parser: str = ""
    # Ours, beyond LMI's keys.
    device: str = "auto"
    block_size: int = 16
    # None: sized from memory (gpu_memory_utilization on CUDA, cpu_kv_cache_mb on CPU).
    num_kv_blocks: int | None = None
    cpu_kv_cache_mb: int = 2048
    # Tokens one step may compute, decodes and prefills together. With chunked prefill a longer prompt is
    # computed over several steps, alongside the running decodes; without, it still runs, as the only prefill.
    # A burst of waiting prompts starts prefilling in fewer, larger steps the larger this is: 4096 gave 64
    # prompts arriving at once their first tokens sooner (TTFT p50) and more tokens/s than 2048 did, at the
    # price of a longer pause for running streams during such a step (docs/BENCHMARKS.md, Serving path).
    max_num_batched_tokens: int = 4096
    enable_chunked_prefill: bool = True
    # Keep full KV blocks after their sequence ends and reuse them for prompts that start the same way
    # (with the same adapter content).
    enable_prefix_caching: bool = True
    # Where downloaded models and adapters are cached; an s3:// url of an adapters.tar.gz.
    cache_dir: str = ""
    adapters_url: str = ""
    # Local directories adapter sources may be registered from, besides the model and cache dirs.
    adapter_source_roots: list[str] = field(default_factory=list)
    max_archive_bytes: int = 16 * 1024**3
    # Where a name no one registered is looked up on first use: s3://bucket/prefix/ (<name>/ or <name>.tar.gz),
    # hf://org/ (the Hub repo org/<name>) or a local directory; "" looks nothing up.
    adapter_resolver: str = ""
    # Adapters the resolver registered that are kept (registered, their files on disk); past it the least
    # recently requested one is evicted. Adapters registered at start-up or through the API do not count.
    max_disk_loras: int = 256
    # DJL's key: requests accepted but not yet running. Past max_rolling_batch_size running plus this many
    # waiting, a request is answered at once (503, 429 on the TGI routes) instead of queueing.
    job_queue_size: int = 1000
    # A step that admits requests for an adapter not yet resident waits at most this many steps.
    max_adapter_wait_steps: int = 64
    # torch's threads on a CPU: "auto" follows the cores other processes leave free, up to torch's own count
    # (handler/cpu_threads.py); a number fixes it.
    cpu_threads: str = "auto"
    # LMI's and vLLM's name: "true" runs every step eagerly; "false" compiles the decode step with torch.compile
    # wherever it can (handler/runner/compiled_decode.py); "auto" does so for models large enough that their
    # decode steps pay back the compile at start (tiny models start at once and stay eager).
    enforce_eager: str = "auto"
    # Decode steps of up to this many sequences run compiled (default: max_rolling_batch_size).
    max_compiled_batch_size: int | None = None
    # Seconds a tensor-parallel collective may wait for a peer before the engine gives up on it (a hung rank).
    tensor_parallel_timeout: int = 120

    def __post_init__(self) -> None:
        self._validate()

    # ---- construction -------------------------------------------------------------------------------

    @classmethod
    def from_options(cls, model_id: str | os.PathLike | None = None, **options: Any) -> "Config":
        """Keyword options as Python callers write them (`Engine(model_dir, max_loras=8)`)."""
        values = dict(options)
        if model_id is not None:
            values["model_id"] = str(model_id)
        return cls._from_raw(values)

    @classmethod
    def load(
        cls,
        model_dir: str | os.PathLike | None,
        env: Mapping[str, str] | None = None,
        overrides: Mapping[str, Any] | None = None,
    ) -> "Config":
        """What the container does at start: environment, then serving.properties (the file wins)."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for env_name, key in ENV_ALIASES.items():
            if env.get(env_name):
                values[key] = env[env_name]
        for name, value in env.items():
            if name.startswith("OPTION_"):
                values[name[len("OPTION_") :].lower()] = value
        if model_dir is not None:
            properties_path = Path(model_dir) / PROPERTIES_FILE
            if properties_path.is_file():
                for key, value in parse_properties(properties_path.read_text()).items():
                    if key.startswith("option."):
                        values[key[len("option.") :]] = value
                    elif key in TOP_LEVEL_KEYS:
                        values[key] = value
                    else:
                        logger.warning("serving.properties: ignoring unknown key %r", key)
            if not values.get("model_id"):
                values["model_id"] = str(model_dir)
        values.update(overrides or {})
        return cls._from_raw(values)

    @classmethod
    def _from_raw(cls, values: Mapping[str, Any]) -> "Config":
        known = {f.name: f for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, raw in values.items():
            if key not in known:
                logger.warning("ignoring unknown option %r", key)
                continue
            kwargs[key] = _coerce(key, raw, known[key])
        return cls(**kwargs)

    # ---- derived values -----------------------------------------------------------------------------

    @property
    def torch_dtype_name(self) -> str:
        """'float32' | 'float16' | 'bfloat16' | 'auto' after alias resolution."""
        return DTYPE_NAMES[self.dtype]

    @property
    def cpu_lora_capacity(self) -> int:
        return self.max_loras if self.max_cpu_loras is None else self.max_cpu_loras

    @property
    def cache_path(self) -> Path:
        return Path(self.cache_dir).expanduser() if self.cache_dir else DEFAULT_CACHE_DIR

    # ---- validation ---------------------------------------------------------------------------------

    def _validate(self) -> None:
        self.dtype = self.dtype.lower()
        if self.dtype not in DTYPE_NAMES:
            raise ConfigError("dtype", self.dtype, f"expected one of {sorted(DTYPE_NAMES)}")
        self.rolling_batch = self.rolling_batch.lower()
        if self.rolling_batch not in ROLLING_BATCH_NAMES:
            raise ConfigError("rolling_batch", self.rolling_batch, f"expected one of {sorted(ROLLING_BATCH_NAMES)}")
        self.output_formatter = self.output_formatter.lower()
        if self.output_formatter not in OUTPUT_FORMATTERS:
            raise ConfigError("output_formatter", self.output_formatter, f"expected one of {sorted(OUTPUT_FORMATTERS)}")
        self._validate_chat_parsers()
        _require_positive(self, "max_rolling_batch_size", "max_loras", "max_lora_rank", "block_size",
                          "max_num_batched_tokens", "cpu_kv_cache_mb", "max_archive_bytes",
                          "max_adapter_wait_steps", "tensor_parallel_timeout", "max_disk_loras", "job_queue_size")
        if self.tensor_parallel_degree <= 0 and self.tensor_parallel_degree != TENSOR_PARALLEL_MAX:
            raise ConfigError("tensor_parallel_degree", self.tensor_parallel_degree,
                              "must be a positive integer or max")
        self.enforce_eager = str(self.enforce_eager).strip().lower()
        if self.enforce_eager not in ("auto", "true", "false"):
            raise ConfigError("enforce_eager", self.enforce_eager, "expected auto, true or false")
        for name in ("max_cpu_loras", "max_model_len", "num_kv_blocks", "max_compiled_batch_size"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(name, value, "must be a positive integer")
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            # Everything in a device slot also has its host copy, so fewer host places than slots is
            # a contradiction; LMI rejects it too.
            raise ConfigError("max_cpu_loras", self.max_cpu_loras,
                              f"must be at least max_loras ({self.max_loras})")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ConfigError("gpu_memory_utilization", self.gpu_memory_utilization, "must be in (0, 1]")
        if self.lora_extra_vocab_size < 0:
            raise ConfigError("lora_extra_vocab_size", self.lora_extra_vocab_size, "must be >= 0")
        self.cpu_threads = str(self.cpu_threads).strip().lower()
        if self.cpu_threads != "auto" and not (self.cpu_threads.isdigit() and int(self.cpu_threads) > 0):
            raise ConfigError("cpu_threads", self.cpu_threads, "expected auto or a positive integer")
        self.device = self.device.lower()
        if self.device != "auto" and self.device != "cpu" and not self.device.startswith("cuda"):
            raise ConfigError("device", self.device, "expected auto, cpu or cuda[:N]")

    def _validate_chat_parsers(self) -> None:
        self.tool_call_parser = self.tool_call_parser.strip().lower()
        if self.tool_call_parser and self.tool_call_parser not in TOOL_CALL_PARSERS:
            raise ConfigError("tool_call_parser", self.tool_call_parser, f"expected one of {sorted(TOOL_CALL_PARSERS)}")
        if self.enable_auto_tool_choice and not self.tool_call_parser:
            raise ConfigError("enable_auto_tool_choice", self.enable_auto_tool_choice,
                              "needs option.tool_call_parser: the format the model writes its calls in")
        self.reasoning_parser = self.reasoning_parser.strip().lower()
        if self.reasoning_parser and self.reasoning_parser not in REASONING_PARSERS:
            raise ConfigError("reasoning_parser", self.reasoning_parser, f"expected one of {sorted(REASONING_PARSERS)}")


def _require_positive(config: Config, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if value <= 0:
            raise ConfigError(name, value, "must be a positive integer")


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _coerce(key: str, raw: Any, spec: dataclasses.Field) -> Any:
    """Turn a properties/env string (or a Python value) into the field's type, naming the key on error."""
    annotation = str(spec.type)
    if raw is None:
        return None
    if key == "tensor_parallel_degree" and isinstance(raw, str) and raw.strip().lower() == "max":
        return TENSOR_PARALLEL_MAX  # LMI's "max": every visible device, resolved by the engine
    try:
        if annotation == "bool":
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in _TRUE:
                return True
            if text in _FALSE:
                return False
            raise ValueError("expected true or false")
        if annotation.startswith("int"):
            if isinstance(raw, bool):
                raise ValueError("expected an integer")
            if isinstance(raw, int):
                return raw
            text = str(raw).strip()
            if annotation.endswith("None") and text.lower() in {"", "none", "null"}:
                return None
            return int(text)
        if annotation == "float":
            return float(raw)
        if annotation.startswith("list"):
            if isinstance(raw, (list, tuple)):
                return [str(item) for item in raw]
            return [part.strip() for part in str(raw).split(",") if part.strip()]
        return str(raw).strip()
    except (TypeError, ValueError) as error:
        raise ConfigError(key, raw, str(error) or f"expected {annotation}") from None


def parse_properties(text: str) -> dict[str, str]:
    """Java-properties syntax: `key=value`, `key: value` or `key value`; # and ! comments; \\ continues."""
    result: dict[str, str] = {}
    logical_lines: list[str] = []
    pending = ""
    for raw_line in text.splitlines():
        line = raw_line.lstrip()
        if not pending and (not line or line[0] in "#!"):
            continue
        if _ends_with_continuation(line):
            pending += line[:-1]
            continue
        logical_lines.append(pending + line)
        pending = ""
    if pending:
        logical_lines.append(pending)
    for line in logical_lines:
        key, value = _split_property(line)
        if key:
            result[key] = value
    return result


def _ends_with_continuation(line: str) -> bool:
    trailing_backslashes = len(line) - len(line.rstrip("\\"))
    return trailing_backslashes % 2 == 1


def _split_property(line: str) -> tuple[str, str]:
    key_chars: list[str] = []
    index = 0
    while index < len(line):
        char = line[index]
        if char == "\\" and index + 1 < len(line):
            key_chars.append(line[index + 1])
            index += 2
            continue
        if char in "=:" or char.isspace():
            break
        key_chars.append(char)
        index += 1
    rest = line[index:].lstrip()
    if rest[:1] in ("=", ":"):
        rest = rest[1:].lstrip()
    return "".join(key_chars), rest.rstrip()
