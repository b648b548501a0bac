"""option.adapter_resolver under DJL's real worker in rolling-batch mode, where DJL's thread steps the engine: a
name no one registered is looked up on first use, in a local directory or in S3 (moto's server, behind a relay
that counts what the worker asks of it), kept within option.max_disk_loras, and a missing, unsafe, escaping or
failing name fails alone."""

from __future__ import annotations

import shutil

from tests.djl.conftest import PROMPT, djl_model_dir, generate, running_worker, token_ids
from tests.server.test_s3_startup import pack, upload_dir
from tests.storage.conftest import aws_env, moto_endpoint, s3, s3_admin  # noqa: F401  (moto fixtures, reused)
from tests.storage.s3_relay import S3Relay


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


def test_rolling_batch_resolves_from_s3_folder_and_archive(djl_dir, s3, moto_endpoint, server_base,  # noqa: F811
                                                            server_adapters, expected, tmp_path):
    s3.create_bucket(Bucket="tenants")
    upload_dir(s3, server_adapters["a1"], "tenants", "lora/t-folder")
    s3.upload_file(str(pack(tmp_path / "t.tar.gz", {"t-archive": server_adapters["a2"]})), "tenants",
                   "lora/t-archive.tar.gz")
    upload_dir(s3, server_adapters["a2"], "tenants", "lora/flaky")
    model_dir = djl_model_dir(server_base, {}, tmp_path / "model", "rolling_batch",
                              adapter_resolver="s3://tenants/lora/", cache_dir=str(tmp_path / "cache"))
    with S3Relay(moto_endpoint) as relay, \
            running_worker(djl_dir, model_dir, tmp_path, extra_env={"AWS_ENDPOINT_URL_S3": relay.endpoint}) as front_end:
        # Four first requests at once for one cold folder: one listing (held back so that all four arrive
        # while it runs) and one download per file (a HEAD, then a GET), then all four served by it.
        relay.delay("ListObjectsV2", 0.5)
        first = [front_end.submit(generate(PROMPT, "t-folder")) for _ in range(4)]
        assert [token_ids(answer.wait().json()) for answer in first] == [expected(PROMPT, "a1")] * 4
        relay.delay("ListObjectsV2", 0.0)
        files = sum(1 for path in server_adapters["a1"].iterdir() if path.is_file())
        assert relay.counted() == {"ListObjectsV2": 1, "HeadObject": files, "GetObject": files}

        # The .tar.gz form: no folder of that name, so the archive.
        relay.reset()
        assert token_ids(front_end.submit(generate(PROMPT, "t-archive")).wait().json()) == expected(PROMPT, "a2")
        assert relay.counted().get("GetObject") == 1

        # Unknown: 404 naming it and where it was looked for; asked again, answered without asking S3.
        relay.reset()
        missing = front_end.submit(generate(PROMPT, "nobody")).wait()
        looked_up = sum(relay.counted().values())
        again = front_end.submit(generate(PROMPT, "nobody")).wait()
        unsafe = front_end.submit(generate(PROMPT, "../t-folder")).wait()
        assert sum(relay.counted().values()) == looked_up >= 1

        # A download that fails is that request's error (S3's 500s, after the client's retries); the next is served.
        relay.fail_keys("tenants", "lora/flaky/")
        failed = front_end.submit(generate(PROMPT, "flaky")).wait()
        relay.heal()
        assert token_ids(front_end.submit(generate(PROMPT, "flaky")).wait().json()) == expected(PROMPT, "a2")
        assert token_ids(front_end.submit(generate(PROMPT, "t-folder")).wait().json()) == expected(PROMPT, "a1")
        log = front_end.worker.output()
    assert missing.code == 404 and "nobody" in missing.body.decode() and "s3://tenants/lora/" in missing.body.decode()
    assert again.code == 404 and "nobody" in again.body.decode()
    assert unsafe.code == 400 and "adapter name" in unsafe.body.decode()
    assert failed.code == 503 and "lora/flaky/" in failed.body.decode()
    assert log.count("resolved adapter t-folder from s3://tenants/lora/t-folder/") == 1
    assert "resolved adapter t-archive from s3://tenants/lora/t-archive.tar.gz" in log
