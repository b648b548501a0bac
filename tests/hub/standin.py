"""A small local stand-in for the Hugging Face Hub, for tests: `HF_ENDPOINT` pointed at it, huggingface_hub
downloads from it as it does from huggingface.co.

It speaks the endpoints huggingface_hub's downloads use, with the Hub's answers for failures:
    GET  /api/models/{repo}/revision/{revision}     repo info: the commit a branch or tag points at
    GET  /api/models/{repo}/tree/{revision}[/path]  the file listing (recursive)
    HEAD /{repo}/resolve/{revision}/{path}          file metadata (X-Repo-Commit, ETag, size)
    GET  /{repo}/resolve/{revision}/{path}          the file
A repo is a set of commits, each a local directory; branches and tags name commits. A repo may be private
(visible to its tokens only) or gated (its tokens only; others are told it is gated). Tokens not known to the
stand-in are refused on every request, as the Hub refuses invalid credentials. Every request is recorded,
so tests can see what was fetched.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

# Files at least this big are listed as LFS files, as the Hub lists weights.
LFS_THRESHOLD = 10_000


@dataclass
class StandinRepo:
    commits: dict[str, Path] = field(default_factory=dict)  # commit hash -> directory
    refs: dict[str, str] = field(default_factory=dict)  # branch or tag -> commit hash
    private: bool = False
    gated: bool = False
    tokens: set[str] = field(default_factory=set)  # tokens that may read it when private or gated


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    token: str | None


class HubStandin:
    def __init__(self) -> None:
        self.repos: dict[str, StandinRepo] = {}
        self.known_tokens: set[str] = set()
        self.requests: list[RecordedRequest] = []
        self._held: dict[str, threading.Event] = {}  # repo id -> set when its answers may go out
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._thread = threading.Thread(target=self._server.serve_forever, name="hub-standin", daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "HubStandin":
        self._thread.start()
        return self

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def add_repo(self, repo_id: str, directory: Path, *, refs: tuple[str, ...] = ("main",), private: bool = False,
                 gated: bool = False, tokens: tuple[str, ...] = ()) -> str:
        """Publish `directory` as a commit of `repo_id` that `refs` point at; returns the commit hash."""
        repo = self.repos.setdefault(repo_id, StandinRepo())
        repo.private, repo.gated = repo.private or private, repo.gated or gated
        repo.tokens.update(tokens)
        self.known_tokens.update(tokens)
        commit = _commit_hash(repo_id, directory)
        repo.commits[commit] = directory
        for ref in refs:
            repo.refs[ref] = commit
        return commit

    def hold(self, repo_id: str) -> None:
        """Make every request about `repo_id` wait (a slow Hub) until `release`."""
        self._held[repo_id] = threading.Event()

    def release(self, repo_id: str) -> None:
        self._held.pop(repo_id).set()

    def wait_if_held(self, repo_id: str) -> None:
        held = self._held.get(repo_id)
        if held is not None:
            held.wait(120)

    def fetched_files(self, repo_id: str) -> set[str]:
        """Paths of `repo_id` whose content was downloaded (GET on resolve)."""
        prefix = f"/{repo_id}/resolve/"
        return {request.path[len(prefix):].split("/", 1)[1] for request in self.requests
                if request.method == "GET" and request.path.startswith(prefix)}

    def record(self, request: RecordedRequest) -> None:
        with self._lock:
            self.requests.append(request)


_API = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/(?P<kind>revision|tree)/(?P<rest>.+)$")
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rest>.+)$")


def _handler_for(hub: HubStandin):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet: the tests read hub.requests
            pass

        def do_HEAD(self) -> None:
            self._answer(send_body=False)

        def do_GET(self) -> None:
            self._answer(send_body=True)

        def _answer(self, send_body: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            token = _bearer(self.headers.get("Authorization"))
            hub.record(RecordedRequest(self.command, path, token))
            if token is not None and token not in hub.known_tokens:
                return self._error(401, message="Invalid credentials in Authorization header")
            if match := _API.match(path):
                repo_id, kind, rest = match["repo"], match["kind"], match["rest"]
            elif match := _RESOLVE.match(path):
                repo_id, kind, rest = match["repo"], "resolve", match["rest"]
            else:
                return self._error(404, message="Not Found")
            hub.wait_if_held(repo_id)
            repo = hub.repos.get(repo_id)
            if repo is None or (repo.private and token not in repo.tokens):
                return self._error(401 if token is None else 404, code="RepoNotFound",
                                   message="Repository not found")
            if repo.gated and token not in repo.tokens:
                return self._error(401 if token is None else 403, code="GatedRepo",
                                   message="Access to this model is restricted. You must have access to it "
                                           "and be authenticated to access it.")
            commit, file_path = _split_revision(repo, rest)
            if commit is None:
                return self._error(404, code="RevisionNotFound", message="Invalid rev id")
            directory = repo.commits[commit]
            if kind == "revision":
                return self._json({"id": repo_id, "sha": commit, "private": repo.private,
                                   "gated": "auto" if repo.gated else False,
                                   "siblings": [{"rfilename": name} for name in _files(directory)]})
            if kind == "tree":
                entries = [_tree_entry(directory, name) for name in _files(directory)
                           if not file_path or name.startswith(file_path.rstrip("/") + "/")]
                return self._json(entries)
            file = directory / file_path
            if not file_path or file_path not in _files(directory):
                return self._error(404, code="EntryNotFound", message="Entry not found")
            data = file.read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("X-Repo-Commit", commit)
            self.send_header("ETag", f'"{_etag(data)}"')
            self.end_headers()
            if send_body:
                self.wfile.write(data)

        def _json(self, payload) -> None:
            body = json.dumps(payload).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _error(self, status: int, *, message: str, code: str | None = None) -> None:
            body = json.dumps({"error": message}).encode()
            self.send_response(status)
            if code:
                self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", message)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

    return Handler


def _split_revision(repo: StandinRepo, rest: str) -> tuple[str | None, str]:
    """'{revision}/{path}' -> (commit, path). A revision may hold slashes (refs/pr/1): try the longest first."""
    parts = rest.split("/")
    for cut in range(len(parts), 0, -1):
        revision, file_path = "/".join(parts[:cut]), "/".join(parts[cut:])
        if revision in repo.commits:
            return revision, file_path
        if revision in repo.refs:
            return repo.refs[revision], file_path
    return None, ""


def _files(directory: Path) -> list[str]:
    return sorted(str(path.relative_to(directory)) for path in directory.rglob("*") if path.is_file())


def _tree_entry(directory: Path, name: str) -> dict:
    data = (directory / name).read_bytes()
    entry = {"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
    if len(data) >= LFS_THRESHOLD:
        entry["lfs"] = {"oid": _etag(data), "size": len(data), "pointerSize": 134}
    return entry


def _etag(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _commit_hash(repo_id: str, directory: Path) -> str:
    digest = hashlib.sha1(repo_id.encode())
    for name in _files(directory):
        digest.update(name.encode())
        digest.update(hashlib.sha256((directory / name).read_bytes()).digest())
    return digest.hexdigest()


def _bearer(header: str | None) -> str | None:
    if header and header.lower().startswith("bearer "):
        return header[len("bearer "):].strip() or None
    return None
