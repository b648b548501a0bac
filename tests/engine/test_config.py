"""Config from serving.properties, OPTION_* environment and keywords, as LMI users write them."""

from __future__ import annotations

import pytest

from lora_serving.handler.config import TENSOR_PARALLEL_MAX, Config, parse_properties
from lora_serving.handler.errors import ConfigError

SAGEMAKER_LORA_EXAMPLE_ENV = {
    "OPTION_ROLLING_BATCH": "lmi-dist",
    "OPTION_MAX_ROLLING_BATCH_SIZE": "32",
    "OPTION_DTYPE": "fp16",
    "OPTION_ENABLE_LORA": "true",
    "OPTION_GPU_MEMORY_UTILIZATION": "0.8",
    "OPTION_MAX_LORA_RANK": "64",
    "OPTION_MAX_CPU_LORAS": "4",
    "OPTION_TRUST_REMOTE_CODE": "true",
}


def test_sagemaker_multi_tenant_lora_environment_is_accepted(tmp_path):
    config = Config.load(tmp_path, env=SAGEMAKER_LORA_EXAMPLE_ENV)
    assert config.rolling_batch == "lmi-dist"
    assert config.max_rolling_batch_size == 32
    assert config.torch_dtype_name == "float16"
    assert config.enable_lora is True
    assert config.gpu_memory_utilization == 0.8
    assert config.max_lora_rank == 64
    assert config.cpu_lora_capacity == 4
    assert config.trust_remote_code is True
    assert config.model_id == str(tmp_path)


def test_properties_file_wins_over_environment_and_aliases_apply(tmp_path):
    (tmp_path / "serving.properties").write_text(
        "# LMI properties\n"
        "engine=Python\n"
        "option.model_id = s3://bucket/model/\n"
        "option.max_rolling_batch_size: 16\n"
        "option.dtype bf16\n"
        "option.enable_lora=true\n"
        "option.max_loras=\\\n    8\n"
        "option.some_future_key=1\n"
        "unknown.top_level=1\n"
    )
    env = {"OPTION_MAX_ROLLING_BATCH_SIZE": "64", "HF_MODEL_ID": "/elsewhere", "MAX_BATCH_SIZE": "3",
           "SM_NUM_GPUS": "1", "CUDA_MEMORY_FRACTION": "0.5", "OPTION_MAX_LORA_RANK": "32"}
    config = Config.load(tmp_path, env=env)
    assert config.model_id == "s3://bucket/model/"
    assert config.max_rolling_batch_size == 16
    assert config.torch_dtype_name == "bfloat16"
    assert config.max_loras == 8
    assert config.max_lora_rank == 32
    assert config.gpu_memory_utilization == 0.5
    assert config.tensor_parallel_degree == 1


@pytest.mark.parametrize(
    "key,value,fragment",
    [
        ("max_rolling_batch_size", "lots", "option.max_rolling_batch_size='lots'"),
        ("max_rolling_batch_size", "0", "must be a positive integer"),
        ("dtype", "int4", "option.dtype='int4'"),
        ("enable_lora", "maybe", "option.enable_lora='maybe'"),
        ("gpu_memory_utilization", "1.5", "option.gpu_memory_utilization"),
        ("rolling_batch", "static", "option.rolling_batch='static'"),
        ("output_formatter", "xml", "option.output_formatter"),
        ("max_cpu_loras", "1", "must be at least max_loras"),
        ("enable_prefix_caching", "sometimes", "option.enable_prefix_caching='sometimes'"),
        ("max_num_batched_tokens", "0", "must be a positive integer"),
        ("tool_call_parser", "pythonic", "option.tool_call_parser='pythonic': expected one of"),
        ("enable_auto_tool_choice", "true", "needs option.tool_call_parser"),
        ("reasoning_parser", "granite", "option.reasoning_parser='granite'"),
    ],
)
def test_bad_values_name_the_key(tmp_path, key, value, fragment):
    with pytest.raises(ConfigError) as error:
        Config.load(tmp_path, env={f"OPTION_{key.upper()}": value})
    assert fragment in str(error.value)


def test_every_lmi_spelling_of_rolling_batch_and_dtype_is_accepted():
    for name in ("auto", "lmi-dist", "vllm", "scheduler"):
        assert Config.from_options(rolling_batch=name).rolling_batch == name
    expected = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32", "float16": "float16",
                "bfloat16": "bfloat16", "float32": "float32", "auto": "auto"}
    for name, torch_name in expected.items():
        assert Config.from_options(dtype=name).torch_dtype_name == torch_name


def test_prefix_caching_and_chunked_prefill_are_on_unless_turned_off(tmp_path):
    assert Config.load(tmp_path, env={}).enable_prefix_caching and Config.load(tmp_path, env={}).enable_chunked_prefill
    (tmp_path / "serving.properties").write_text("option.enable_prefix_caching=false\n"
                                                 "option.enable_chunked_prefill=false\n"
                                                 "option.max_num_batched_tokens=512\n")
    config = Config.load(tmp_path, env={})
    assert (config.enable_prefix_caching, config.enable_chunked_prefill, config.max_num_batched_tokens) == (
        False, False, 512)


def test_tensor_parallel_max_is_kept_for_the_engine_to_count_devices():
    # The engine resolves it: every visible GPU, or 1 on a CPU (tests/tp/test_tp_failures.py).
    assert Config.from_options(tensor_parallel_degree="max").tensor_parallel_degree == TENSOR_PARALLEL_MAX
    with pytest.raises(ConfigError, match="option.tensor_parallel_degree=0: must be a positive integer or max"):
        Config.from_options(tensor_parallel_degree="0")


def test_properties_parser_handles_java_syntax():
    parsed = parse_properties("a=1\n! comment\nb : two words \nc\\ d=3\ne=x\\\n  y\nempty=\n")
    assert parsed == {"a": "1", "b": "two words", "c d": "3", "e": "xy", "empty": ""}
