"""Models and adapters named by Hugging Face Hub id, fetched with huggingface_hub into the Hub cache.

Only what the engine reads is fetched: a model's config, tokenizer and chat-template files, generation
config and safetensors weights (the shards its index names, else `model.safetensors`); an adapter's
adapter_config.json and adapter_model.safetensors. Never a repo's pickled `.bin`/`.pt` weights, GGUF, ONNX or
other copies, and nothing from its subfolders (Llama 3's `original/`, quantized variants).

The Hub settings come from the environment the container was given (`HF_ENDPOINT`, `HF_TOKEN`, `HF_HUB_CACHE`
/ `HF_HOME`, `HF_HUB_OFFLINE`) and are passed to huggingface_hub explicitly, so that they hold for the
environment handed to start-up, not only for the one huggingface_hub read when it was imported.

Every failure is a HubError whose message names the repo, the revision and the cause, raised without
retrying: a repo that is missing, gated or refuses the token will not change its answer a second later.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from lora_serving.handler.config import Config
from lora_serving.handler.errors import EngineError
from lora_serving.handler.models.weights import INDEX_FILE as WEIGHTS_INDEX_FILE
from lora_serving.handler.models.weights import shards_named_by_index

logger = logging.getLogger(__name__)

DEFAULT_REVISION = "main"
# Hub repo ids: `namespace/name`, letters, digits, `-`, `_`, `.` (the Hub's own rule, without legacy
# namespace-less ids, which a mistyped local directory name would look like).
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")
HF_URL_SCHEME = "hf://"

SINGLE_WEIGHTS_FILE = "model.safetensors"
# Everything a model needs besides its weights, at the top of the repo only.
MODEL_METADATA_FILES = [
    "config.json", "generation_config.json", WEIGHTS_INDEX_FILE,
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
]
ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors"]
# fnmatch's `*` crosses `/`: this keeps every pattern at the repo's top level.
_SUBFOLDERS = ["*/*"]
# Suffixes worth naming when a repo has no safetensors weights.
_OTHER_WEIGHT_FORMATS = (".bin", ".pt", ".pth", ".gguf", ".onnx", ".h5", ".msgpack", ".ckpt")


class HubError(EngineError):
    """The Hub (or its cache) could not provide a repo."""


class HubRepoNotFoundError(HubError):
    """No such repo or revision, or a private repo the token cannot see."""


class HubAccessError(HubError):
    """A gated repo without a token that grants access, or a token the Hub refuses."""


class HubUnreachableError(HubError):
    """The Hub could not be reached (or offline mode is on) and the cache does not hold the files."""


class HubContentError(HubError):
    """The repo is there but holds nothing this engine can load (no safetensors, no adapter, too large)."""


@dataclass(frozen=True, slots=True)
class HubSettings:
    endpoint: str | None
    token: str | None
    cache_dir: Path
    offline: bool

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> "HubSettings":
        """huggingface_hub's own variables and precedence: HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache."""
        if env.get("HF_HUB_CACHE"):
            cache_dir = Path(env["HF_HUB_CACHE"])
        elif env.get("HF_HOME"):
            cache_dir = Path(env["HF_HOME"]) / "hub"
        else:
            cache_dir = Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface" / "hub"
        token = (env.get("HF_TOKEN") or env.get("HUGGING_FACE_HUB_TOKEN") or "").strip() or None
        offline = env.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
        return cls(endpoint=(env.get("HF_ENDPOINT") or "").rstrip("/") or None, token=token,
                   cache_dir=cache_dir.expanduser(), offline=offline)

    @property
    def where(self) -> str:
        return self.endpoint or "https://huggingface.co"


def is_hub_id(text: str) -> bool:
    return bool(_HUB_ID.fullmatch(text)) and ".." not in text and "--" not in text


def served_model_name(model_id: str) -> str:
    """The name clients call the base model by: a Hub id as given (vLLM's served name), also once it has become
    its snapshot directory (`.../models--org--name/snapshots/<commit>`); else the directory's name."""
    path = Path(model_id.rstrip("/"))
    if is_hub_id(model_id):
        return model_id
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        parts = path.parent.parent.name[len("models--"):].split("--")
        if len(parts) == 2 and is_hub_id("/".join(parts)):
            return "/".join(parts)
    return path.name or "model"


def parse_hf_url(url: str) -> tuple[str, str]:
    """`hf://org/name[@revision]` -> (repo id, revision); ValueError naming what is wrong."""
    if not url.startswith(HF_URL_SCHEME):
        raise ValueError(f"{url!r} is not an {HF_URL_SCHEME} URL")
    repo_id, _, revision = url[len(HF_URL_SCHEME):].partition("@")
    if not is_hub_id(repo_id):
        raise ValueError(f"{url!r}: expected {HF_URL_SCHEME}org/name or {HF_URL_SCHEME}org/name@revision, with a "
                         f"Hub repo id of letters, digits, '-', '_' and '.'")
    if "@" in url[len(HF_URL_SCHEME):] and not revision.strip():
        raise ValueError(f"{url!r}: empty revision after '@'")
    return repo_id, revision.strip() or DEFAULT_REVISION


def fetch_model_for(config: Config, settings: HubSettings) -> Path:
    """The model of a Config whose model_id is a Hub id."""
    logger.info("fetching Hub model %s (revision %s) from %s into %s%s", config.model_id,
                config.revision or DEFAULT_REVISION, settings.where, settings.cache_dir,
                " (offline: cache only)" if settings.offline else "")
    return fetch_model(config.model_id, config.revision, settings, with_code=config.trust_remote_code)


def fetch_model(repo_id: str, revision: str, settings: HubSettings, *, with_code: bool = False) -> Path:
    """The local snapshot directory of model `repo_id` at `revision`, downloading what is missing.

    `with_code`: also the repo's top-level `*.py` (option.trust_remote_code).
    """
    revision = revision or DEFAULT_REVISION
    metadata = MODEL_METADATA_FILES + (["*.py"] if with_code else [])
    snapshot = _snapshot(repo_id, revision, settings, metadata)
    if not (snapshot / "config.json").is_file():
        raise HubContentError(f"{_described(repo_id, revision, settings)} has no config.json: not a transformers "
                              f"model repo")
    # The commit the first call resolved: the weights come from the same one, with no second lookup.
    commit = snapshot.name
    index = snapshot / WEIGHTS_INDEX_FILE
    try:
        shards = shards_named_by_index(index) if index.is_file() else [SINGLE_WEIGHTS_FILE]
    except ValueError as error:
        raise HubContentError(f"{_described(repo_id, revision, settings)}: {error}") from None
    _snapshot(repo_id, commit, settings, shards)
    missing = [shard for shard in shards if not (snapshot / shard).is_file()]
    if missing:
        raise HubContentError(f"{_described(repo_id, revision, settings)} has no safetensors weights (missing "
                              f"{', '.join(missing[:3])}){_other_formats(repo_id, commit, settings)}: this "
                              f"container loads safetensors only")
    return snapshot


def fetch_adapter(repo_id: str, revision: str, settings: HubSettings, *, max_total_bytes: int) -> Path:
    """The local snapshot directory of a PEFT LoRA adapter repo, refused when its files exceed the bound."""
    revision = revision or DEFAULT_REVISION
    if not settings.offline:
        planned = _snapshot(repo_id, revision, settings, ADAPTER_FILES, dry_run=True)
        total = sum(info.file_size or 0 for info in planned if info.will_download)
        if total > max_total_bytes:
            raise HubContentError(f"{_described(repo_id, revision, settings)}: its adapter files hold {total} bytes, "
                                  f"over the bound of {max_total_bytes} (option.max_archive_bytes)")
        if planned:
            revision = planned[0].commit_hash  # what was measured is what gets downloaded
    return _snapshot(repo_id, revision, settings, ADAPTER_FILES)


def _snapshot(repo_id: str, revision: str, settings: HubSettings, patterns: list[str], dry_run: bool = False):
    from huggingface_hub import snapshot_download

    try:
        result = snapshot_download(
            repo_id, revision=revision, cache_dir=settings.cache_dir, endpoint=settings.endpoint,
            token=settings.token, local_files_only=settings.offline, allow_patterns=patterns,
            ignore_patterns=_SUBFOLDERS, dry_run=dry_run,
        )
    except Exception as error:
        # huggingface_hub's errors are OSErrors, as is a cache that cannot be written; a connection lost
        # mid-download is httpx's. Anything else is a bug of ours, not the Hub's answer.
        if isinstance(error, OSError) or type(error).__module__.split(".")[0] in {"httpx", "httpx2"}:
            raise _hub_error(error, repo_id, revision, settings) from None
        raise
    return result if dry_run else Path(result)


def _hub_error(error: BaseException, repo_id: str, revision: str, settings: HubSettings) -> HubError:
    from huggingface_hub.errors import (
        DryRunError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    described = _described(repo_id, revision, settings)
    if isinstance(error, DryRunError) and error.__cause__ is not None:
        return _hub_error(error.__cause__, repo_id, revision, settings)  # the Hub's own answer
    if isinstance(error, GatedRepoError):
        return HubAccessError(f"{described} is gated: {_token_advice(settings, 'access to it')}")
    if isinstance(error, RevisionNotFoundError):
        return HubRepoNotFoundError(f"{described}: the repo has no revision {revision!r} (option.revision: a "
                                    f"branch, tag or commit)")
    if isinstance(error, RepositoryNotFoundError):
        return HubRepoNotFoundError(f"{described}: no such repo, or it is private and "
                                    f"{_token_advice(settings, 'access to it')}")
    if isinstance(error, LocalEntryNotFoundError):
        if settings.offline:
            return HubUnreachableError(f"{described} is not in the Hub cache ({settings.cache_dir}) and "
                                       f"HF_HUB_OFFLINE is set")
        return HubUnreachableError(f"{described}: the Hub could not be reached ({_first_line(error.__cause__ or error)})"
                                   f" and the cache ({settings.cache_dir}) does not hold it")
    if isinstance(error, HfHubHTTPError):
        status = error.response.status_code if error.response is not None else None
        if status == 401:
            return HubAccessError(f"{described}: the Hub refused the token in HF_TOKEN (401: "
                                  f"{error.server_message or 'invalid credentials'})")
        if status == 403:
            return HubAccessError(f"{described}: access denied (403): {_token_advice(settings, 'access to it')}")
        return HubUnreachableError(f"{described}: the Hub answered {status}: {_first_line(error)}")
    if isinstance(error, (ConnectionError, TimeoutError)) or type(error).__module__.startswith("httpx"):
        return HubUnreachableError(f"{described}: the Hub could not be reached ({_first_line(error)})")
    return HubUnreachableError(f"{described}: {_first_line(error)}")


def _other_formats(repo_id: str, commit: str, settings: HubSettings) -> str:
    """', found pytorch_model.bin, model.gguf' when the repo has other weight files; '' if it cannot say."""
    if settings.offline:
        return ""
    from huggingface_hub import HfApi

    try:
        files = HfApi(endpoint=settings.endpoint, token=settings.token or False).list_repo_files(repo_id,
                                                                                                   revision=commit)
    except Exception:  # only for the message; the error it decorates is what matters
        return ""
    others = [name for name in files if name.lower().endswith(_OTHER_WEIGHT_FORMATS)]
    return f"; it has {', '.join(others[:4])}" if others else ""


def _token_advice(settings: HubSettings, what: str) -> str:
    if settings.token is None:
        return f"HF_TOKEN is not set (set it to a token of an account with {what})"
    return f"the token in HF_TOKEN does not grant {what}"


def _described(repo_id: str, revision: str, settings: HubSettings) -> str:
    return f"Hub repo {repo_id} (revision {revision}, at {settings.where})"


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__
