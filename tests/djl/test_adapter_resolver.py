"""option.adapter_resolver under DJL's real worker in rolling-batch mode, where DJL's thread steps the engine: a
name no one registered is looked up in a local directory on first use, kept within option.max_disk_loras, and a
missing or escaping name fails alone."""

from __future__ import annotations

import shutil

from tests.djl.conftest import PROMPT, djl_model_dir, generate, running_worker, token_ids


def test_rolling_batch_resolves_from_a_local_directory(djl_dir, server_base, server_adapters, expected, tmp_path):
    tenants = tmp_path / "tenants"
    shutil.copytree(server_adapters["a1"], tenants / "tenant-1")
    shutil.copytree(server_adapters["a2"], tenants / "tenant-2")
    (tenants / "escape").symlink_to(server_adapters["a2"])
    model_dir = djl_model_dir(server_base, {}, tmp_path / "model", "rolling_batch", adapter_resolver=str(tenants),
                              max_disk_loras="1", cache_dir=str(tmp_path / "cache"))
    with running_worker(djl_dir, model_dir, tmp_path) as front_end:
        first = [front_end.submit(generate(PROMPT, "tenant-1")) for _ in range(3)]
        assert [token_ids(answer.wait().json()) for answer in first] == [expected(PROMPT, "a1")] * 3
        missing = front_end.submit(generate(PROMPT, "ghost")).wait()
        escaping = front_end.submit(generate(PROMPT, "escape")).wait()
        assert token_ids(front_end.submit(generate(PROMPT, "tenant-2")).wait().json()) == expected(PROMPT, "a2")
        assert token_ids(front_end.submit(generate(PROMPT, "tenant-1")).wait().json()) == expected(PROMPT, "a1")
        log = front_end.worker.output()
    assert missing.code == 404 and "ghost" in missing.body.decode()
    assert escaping.code == 400 and "outside" in escaping.body.decode()
    assert log.count("resolved adapter tenant-1 from") == 2  # once, then again after tenant-2 evicted it
    assert "evicted resolved adapter tenant-1" in log and "evicted resolved adapter tenant-2" in log
    assert (tenants / "tenant-1" / "adapter_model.safetensors").is_file()  # the operator's files are left alone
