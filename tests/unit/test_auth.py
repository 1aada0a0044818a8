"""API keys (common/auth.py, services/router/auth.py): the keys file, authentication in constant time
over every stored hash, per-key limits, and request ownership in the router. Served end to end (keys
over gRPC metadata and HTTP headers, a wrong or missing key refused) in tests/integration/test_http_api.py."""
from __future__ import annotations

import json
import stat

import pytest

from common import auth
from common.errors import ConfigError, PermissionDeniedError, UnauthenticatedError
from services.router.auth import ANONYMOUS, KeyLimits, KeyRing, Principal
from services.router.router import RetryLater


def test_keys_file_holds_hashes_only_and_is_private(tmp_path):
    path = tmp_path / "keys.json"
    k1, k2 = auth.new_key(), auth.new_key()
    assert k1 != k2 and k1.startswith("mn-") and len(k1) > 40
    auth.add_key(path, "alice", k1, max_concurrent=2)
    auth.add_key(path, "bob", k2, tokens_per_minute=600)
    text = path.read_text()
    assert k1 not in text and k2 not in text and auth.key_digest(k1) in text
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    entries = auth.load_keys_file(path)
    assert [(e["id"], e["max_concurrent"], e["tokens_per_minute"]) for e in entries] == [("alice", 2, 0),
                                                                                          ("bob", 0, 600)]
    auth.add_key(path, "alice", k2)                    # replaces alice
    assert [e["id"] for e in auth.load_keys_file(path)] == ["bob", "alice"]


@pytest.mark.parametrize("doc, message", [
    ({"keys": []}, "at least one key"),
    ({"keys": [{"id": "", "sha256": "0" * 64}]}, "non-empty string id"),
    ({"keys": [{"id": "a", "sha256": "xyz"}]}, "64 lowercase hex"),
    ({"keys": [{"id": "a", "sha256": "0" * 64, "max_concurrent": -1}]}, "max_concurrent must be an integer >= 0"),
    ({"keys": [{"id": "a", "sha256": "0" * 64}, {"id": "a", "sha256": "1" * 64}]}, "appears twice"),
    ([], "at least one key"),
])
def test_bad_keys_files_are_config_errors(tmp_path, doc, message):
    path = tmp_path / "k.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match=message):
        KeyRing.from_file(str(path))
    with pytest.raises(ConfigError, match="No such file"):
        KeyRing.from_file(str(tmp_path / "missing.json"))


def test_authenticate():
    k1, k2 = auth.new_key(), auth.new_key()
    ring = KeyRing([{"id": "alice", "sha256": auth.key_digest(k1), "max_concurrent": 3},
                    {"id": "bob", "sha256": auth.key_digest(k2)}])
    assert ring.authenticate(k1) == Principal("alice", 3, 0) and ring.authenticate(k2).id == "bob"
    with pytest.raises(UnauthenticatedError, match="an API key is required"):
        ring.authenticate(None)
    with pytest.raises(UnauthenticatedError, match="not valid"):
        ring.authenticate(k1 + "x")
    assert KeyRing(None).authenticate(None) is ANONYMOUS and KeyRing(None).authenticate("any") is ANONYMOUS


def test_presented_key_forms():
    assert auth.presented_key([("authorization", "Bearer abc")]) == "abc"
    assert auth.presented_key([("Authorization", "bearer  abc ")]) == "abc"
    assert auth.presented_key([("x-api-key", b"k2")]) == "k2"
    assert auth.presented_key([("authorization", "Basic Zm9v")]) is None
    assert auth.presented_key([]) is None
    assert auth.bearer("k") == (("authorization", "Bearer k"),) and auth.bearer(None) == ()


def test_resolve_api_key_order(monkeypatch, tmp_path):
    monkeypatch.setattr(auth, "SECRETS_DIR", tmp_path / ".mnemosyne")
    monkeypatch.delenv(auth.API_KEY_ENV, raising=False)
    assert auth.resolve_api_key() is None
    key = auth.ensure_local_key(tmp_path / "keys.json")
    assert auth.resolve_api_key() == key == auth.ensure_local_key(tmp_path / "keys2.json")   # made once
    monkeypatch.setenv(auth.API_KEY_ENV, "from-env")
    assert auth.resolve_api_key() == "from-env" and auth.resolve_api_key("explicit") == "explicit"
    assert KeyRing.from_file(str(tmp_path / "keys.json")).authenticate(key).id == "local"


def test_concurrency_limit():
    limits = KeyLimits()
    alice = Principal("alice", max_concurrent=2)
    limits.acquire(alice, 10)
    limits.acquire(alice, 10)
    with pytest.raises(RetryLater, match="has 2 requests running"):
        limits.acquire(alice, 10)
    limits.acquire(Principal("bob", max_concurrent=1), 10)          # per key
    limits.release(alice)
    limits.acquire(alice, 10)
    limits.acquire(ANONYMOUS, 10**9)                                # no limits
    assert limits.running == {"alice": 2, "bob": 1, "anonymous": 1}


def test_tokens_per_minute_bucket_refills():
    now = [0.0]
    limits = KeyLimits(clock=lambda: now[0])
    carol = Principal("carol", tokens_per_minute=600)                # 10 tokens/s
    limits.acquire(carol, 500)
    limits.release(carol)
    with pytest.raises(RetryLater) as info:
        limits.acquire(carol, 200)                                  # 100 left: 100 more in 10 s
    assert info.value.retry_after_s == pytest.approx(10.0)
    now[0] = 10.0
    limits.acquire(carol, 200)
    with pytest.raises(RetryLater, match="more than API key 'carol' may use in a minute"):
        limits.acquire(carol, 601)


def test_only_the_owner_aborts_its_request():
    from services.router.config import RouterConfig
    from services.router.router import Router, _Active
    router = Router(RouterConfig(kvstore="127.0.0.1:1"), frontend=None, kvstore=None)
    router.active["r1"] = _Active(job=None, owner=Principal("alice"))
    with pytest.raises(PermissionDeniedError, match="belongs to another API key"):
        router.abort("r1", Principal("bob"))
    assert router.active["r1"].aborted is False
    assert router.abort("r1", Principal("alice")) is True and router.active["r1"].aborted
    assert router.abort("nope", Principal("alice")) is False
