"""Fixtures shared by the integration modules that start a deployment (scripts/up.py's Cluster)."""
from __future__ import annotations

import pytest

from common.metadata.store import MetadataStore


@pytest.fixture
def store(cluster):
    """The deployment's metadata in Redis (placements, leases, registrations), read directly: `cluster`
    is the module's own fixture."""
    s = MetadataStore(cluster.redis_url, deployment=cluster.config.deployment, password=cluster.redis_password)
    yield s
    s.close()
