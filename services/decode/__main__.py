"""`python -m services.decode --kvstore HOST:PORT [--model ...] [--kvp 2 --kvp-tokens M] ...` (see --help).

Prints "decode listening on HOST:PORT" once registered and serving; SIGTERM or SIGINT stop it
gracefully: NOT_SERVING, leave the kvstore, drain the requests in flight (--grace-s), stop the grid.
"""
from __future__ import annotations

from common.logs import exit_process
from common.pool_config import start_worker_server
from services.decode.config import DecodeConfig


def main(argv: list[str] | None = None) -> int:
    start_worker_server(DecodeConfig, argv)            # before torch is imported (below)
    from common.pool_service import run_pool_main
    from services.decode.service import DecodeService
    return run_pool_main(DecodeService, DecodeConfig, argv)


if __name__ == "__main__":
    exit_process(main())
