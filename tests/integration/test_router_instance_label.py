"""The router's metrics `instance` label (a real router on loopback): its --instance-id, by default
router-<hostname>-<pid>, never the bind address (0.0.0.0 in every container, where every replica is
also pid 1)."""
from __future__ import annotations

import asyncio
import os
import re
import socket
import urllib.request

import pytest

from services.router.config import RouterConfig
from services.router.service import RouterService
from tests.fixtures.hf_models import write_random_hf_model

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return str(write_random_hf_model(tmp_path_factory.mktemp("label-model"), "llama", num_hidden_layers=2,
                                     max_position_embeddings=512, seed=5))


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read().decode()


@pytest.mark.parametrize("instance_id", ["", "router-7f9c-x2k7q"])
def test_router_metrics_instance_label_is_not_the_bind_address(instance_id, model):
    async def run():
        svc = await RouterService.start(RouterConfig(kvstore="127.0.0.1:1", host="0.0.0.0", port=0, model=model,
                                                     admission=False, instance_id=instance_id, grace_s=0))
        try:
            return await asyncio.to_thread(scrape, svc.metrics_server.url.replace("0.0.0.0", "127.0.0.1"))
        finally:
            await svc.stop()

    text = asyncio.run(run())
    labels = set(re.findall(r'instance="([^"]*)"', text))
    assert labels == {instance_id or f"router-{socket.gethostname()}-{os.getpid()}"}
    # the served model's name (the checkpoint's, as ModelInfo says) on the request-level families
    assert set(re.findall(r'model_name="([^"]*)"', text)) == {model.rsplit("/", 1)[-1]}
