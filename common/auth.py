"""API keys of the public APIs: how a client presents one, where `make up` keeps the one it made, and
the keys file a router checks them against.

A client sends `authorization: Bearer <key>` (gRPC metadata or the HTTP header; gRPC also accepts
`x-api-key: <key>`). The router reads a keys file (JSON, --api-keys-file) holding only SHA-256 hashes:

    {"keys": [{"id": "alice", "sha256": "<hex>", "max_concurrent": 16, "tokens_per_minute": 200000}]}

`id` names the key in logs, metrics and ownership (a request belongs to the key that created it);
`max_concurrent` (requests running at once) and `tokens_per_minute` (prompt + max_tokens admitted
per minute) are its limits, 0 = none.

    key = new_key(); add_key(path, "alice", key)          # `mnemosyne keys new --id alice --file F`
    RouterClient(address)                                 # api_key: MNEMOSYNE_API_KEY, else default_key_path()
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import secrets
from typing import Iterable

from common.errors import ConfigError

API_KEY_ENV = "MNEMOSYNE_API_KEY"
KEY_PREFIX = "mn-"
#: Where `make up` keeps what it generates (git-ignored), relative to the repository root.
SECRETS_DIR = pathlib.Path(__file__).resolve().parent.parent / ".mnemosyne"


def default_key_path() -> pathlib.Path:
    """The API key `make up` generated for this checkout."""
    return SECRETS_DIR / "api-key"


def resolve_api_key(explicit: str | None = None) -> str | None:
    """The key a client presents: `explicit`, else $MNEMOSYNE_API_KEY, else the key `make up` made
    (default_key_path()), else None (an open router needs none)."""
    if explicit:
        return explicit
    if os.environ.get(API_KEY_ENV):
        return os.environ[API_KEY_ENV]
    try:
        return default_key_path().read_text().strip() or None
    except OSError:
        return None


def bearer(key: str | None) -> tuple[tuple[str, str], ...]:
    """gRPC metadata presenting `key` (none for None)."""
    return (("authorization", f"Bearer {key}"),) if key else ()


def presented_key(headers: Iterable[tuple[str, str | bytes]]) -> str | None:
    """The key in gRPC metadata or HTTP headers: `authorization: Bearer <key>` or `x-api-key`."""
    for name, value in headers:
        name = name.lower()
        value = value.decode(errors="replace") if isinstance(value, bytes) else value
        if name == "authorization" and value[:7].lower() == "bearer ":
            return value[7:].strip() or None
        if name == "x-api-key":
            return value.strip() or None
    return None


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def add_key(path: str | os.PathLike, key_id: str, key: str, *, max_concurrent: int = 0,
            tokens_per_minute: int = 0) -> None:
    """Adds (or replaces) `key_id` in the keys file at `path` (created 0600 if absent)."""
    p = pathlib.Path(path)
    doc = json.loads(p.read_text()) if p.exists() else {"keys": []}
    doc["keys"] = [k for k in doc.get("keys", []) if k.get("id") != key_id]
    doc["keys"].append({"id": key_id, "sha256": key_digest(key), "max_concurrent": max_concurrent,
                        "tokens_per_minute": tokens_per_minute})
    _write_private(p, json.dumps(doc, indent=2) + "\n")


def ensure_local_key(keys_file: str | os.PathLike, key_id: str = "local") -> str:
    """What `make up` does: the checkout's key (made once, kept in default_key_path()) and a keys
    file that accepts it. Returns the key."""
    path = default_key_path()
    key = path.read_text().strip() if path.exists() else ""
    if not key:
        key = new_key()
        _write_private(path, key + "\n")
    add_key(keys_file, key_id, key)
    return key


def ensure_secret(path: str | os.PathLike) -> str:
    """A random secret kept in `path` (mode 0600), made when missing or empty: `make up`'s Redis
    password (SECRETS_DIR / "redis-password")."""
    path = pathlib.Path(path)
    text = path.read_text().strip() if path.exists() else ""
    if not text:
        text = secrets.token_urlsafe(24)
        _write_private(path, text + "\n")
    return text


def _write_private(path: pathlib.Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def load_keys_file(path: str | os.PathLike) -> list[dict]:
    """The entries of a keys file, validated; ConfigError naming what is wrong."""
    try:
        doc = json.loads(pathlib.Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"api keys file {path}: {e.strerror}") from None
    except ValueError as e:
        raise ConfigError(f"api keys file {path}: not JSON: {e}") from None
    entries = doc.get("keys") if isinstance(doc, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"api keys file {path}: expected {{\"keys\": [...]}} with at least one key")
    seen = set()
    for i, e in enumerate(entries):
        digest = e.get("sha256", "") if isinstance(e, dict) else ""
        if not isinstance(e, dict) or not isinstance(e.get("id"), str) or not e["id"]:
            raise ConfigError(f"api keys file {path}: keys[{i}] needs a non-empty string id")
        if not isinstance(digest, str) or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ConfigError(f"api keys file {path}: keys[{i}] ({e['id']}) needs sha256, 64 lowercase hex digits")
        for limit in ("max_concurrent", "tokens_per_minute"):
            if not isinstance(e.get(limit, 0), int) or e.get(limit, 0) < 0:
                raise ConfigError(f"api keys file {path}: keys[{i}].{limit} must be an integer >= 0")
        if e["id"] in seen:
            raise ConfigError(f"api keys file {path}: id {e['id']!r} appears twice")
        seen.add(e["id"])
    return entries
