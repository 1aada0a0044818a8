"""`python -m services.kvstore [--port N] [--redis-url URL] [--lease-s S] ...` (see --help).

Prints "kvstore listening on HOST:PORT" once serving; SIGTERM or SIGINT stop it gracefully. Waits
up to --redis-connect-timeout-s for Redis at start, then exits with status 1 and a one-line error.
"""
from __future__ import annotations

import asyncio
import logging
import sys

from common.errors import ConfigError, MnemosyneError
from common.logs import exit_process, setup_logging
from common.standby import hold
from common.rpc.server import serve_until_signal
from services.kvstore.config import KVStoreConfig
from services.kvstore.service import KVStoreService


async def _main(config: KVStoreConfig) -> None:
    svc = await KVStoreService.start(config)
    # The one line scripts (make up, tests) wait for; stdout, flushed.
    print(f"kvstore listening on {svc.address}", flush=True)
    if svc.metrics_server is not None:
        print(f"kvstore metrics on {svc.metrics_server.url}", flush=True)
    await serve_until_signal(svc.server, shutdown=svc.stop)


def main(argv: list[str] | None = None) -> int:
    try:
        config = KVStoreConfig.from_args(argv)
    except ConfigError as e:
        setup_logging("kvstore")
        logging.getLogger("kvstore").error("%s", e)
        return 2
    setup_logging("kvstore", config.observability.log_format)
    hold(lambda: None, "kvstore")          # a standby (make up's supervisor) waits here
    try:
        asyncio.run(_main(config))
    except ConfigError as e:
        logging.getLogger("kvstore").error("%s", e)
        return 2
    except MnemosyneError as e:          # e.g. Redis never answered: one line, no traceback
        logging.getLogger("kvstore").error("%s", e)
        return 1
    return 0


if __name__ == "__main__":
    exit_process(main())
