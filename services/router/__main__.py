"""`python -m services.router --kvstore HOST:PORT [--port 50051] [--model ...]` (see --help).

Prints "router listening on HOST:PORT" once serving; SIGTERM or SIGINT stop it gracefully.
"""
from __future__ import annotations

import asyncio
import importlib
import logging
import sys

from common.errors import MnemosyneError
from common.logs import exit_process, setup_logging
from common.standby import hold
from common.tracing import setup_tracing, shutdown_tracing, tracer
from common.rpc.server import serve_until_signal
from services.router.config import RouterConfig


async def _main(config: RouterConfig, tracer, frontend=None) -> None:
    from services.router.service import RouterService
    svc = await RouterService.start(config, tracer, frontend)
    print(f"router listening on {svc.address}", flush=True)
    if svc.http is not None:
        print(f"router http on {svc.http.url}", flush=True)
    if svc.metrics_server is not None:
        print(f"router metrics on {svc.metrics_server.url}", flush=True)
    await serve_until_signal(svc.server, shutdown=svc.stop)


def main(argv: list[str] | None = None) -> int:
    try:
        config = RouterConfig.from_args(argv)
    except MnemosyneError as e:
        setup_logging("router")
        logging.getLogger("router").error("%s", e)
        return 2
    setup_logging("router", config.observability.log_format)
    loaded = []                           # a standby process (make up's supervisor) loads the tokenizer, then waits
    hold(lambda: loaded.append(importlib.import_module("services.router.service").load_frontend(config)), "router")
    provider = setup_tracing("router", config.observability)
    try:
        asyncio.run(_main(config, tracer(provider), loaded[0] if loaded else None))
    except MnemosyneError as e:
        logging.getLogger("router").error("%s", e)
        return 2
    finally:
        shutdown_tracing(provider)
    return 0


if __name__ == "__main__":
    exit_process(main())
