"""Adapter names: one safe character set, checked by the engine and the container alike."""

from __future__ import annotations

import pytest

from lora_serving.handler.errors import InvalidAdapterError
from lora_serving.handler.lora.names import MAX_ADAPTER_NAME_LENGTH, validate_adapter_name


@pytest.mark.parametrize("name", ["a1", "tenant-42_lora.v2", "A", "0", "_x", "-x", "x" * MAX_ADAPTER_NAME_LENGTH])
def test_good_adapter_names(name):
    assert validate_adapter_name(name) == name


@pytest.mark.parametrize(
    "name, reason",
    [
        ("", "empty"),
        (".hidden", "do not start with '.'"),
        ("..", "do not start with '.'"),
        ("a/b", "invalid"),
        ("../etc", "invalid"),
        ("a b", "invalid"),
        ("naïve", "invalid"),
        ("a\x00b", "invalid"),
        ("x" * (MAX_ADAPTER_NAME_LENGTH + 1), "over 128"),
        (None, "empty"),
    ],
)
def test_bad_adapter_names_are_refused(name, reason):
    with pytest.raises(InvalidAdapterError, match=reason):
        validate_adapter_name(name)
