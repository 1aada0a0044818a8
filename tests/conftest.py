"""Shared fixtures. Keep this file small and generic; suite-specific fixtures live with the tests.

- `redis_server` / `redis_url`: one real redis-server per test session, on a free loopback port,
  in a temporary directory without persistence, requiring a password as `make up`'s does
  (`redis_url` carries it); stopped at the end of the session. Tests isolate
  themselves with their own key prefix (e.g. a unique MetadataStore deployment), never FLUSHALL.
- `free_port`: the function `free_port()` -> a TCP port that was free a moment ago.
"""
from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator

import pytest

from common.metadata.redis_server import RedisServer
from common.metadata.redis_server import free_port as _free_port


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer(password=secrets.token_urlsafe(16)).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.auth_url


@pytest.fixture
def free_port() -> Callable[[], int]:
    return _free_port
