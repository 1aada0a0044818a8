"""`python -m services.prefill --kvstore HOST:PORT [--model ...] [--spp 2] ...` (see --help).

Prints "prefill listening on HOST:PORT" once registered and serving; SIGTERM or SIGINT stop it
gracefully: NOT_SERVING, leave the kvstore, drain the requests in flight (--grace-s), stop the grid.
"""
from __future__ import annotations

from common.logs import exit_process
from common.pool_config import start_worker_server
from services.prefill.config import PrefillConfig


def main(argv: list[str] | None = None) -> int:
    start_worker_server(PrefillConfig, argv)            # before torch is imported (below)
    from common.pool_service import run_pool_main
    from services.prefill.service import PrefillService
    return run_pool_main(PrefillService, PrefillConfig, argv)


if __name__ == "__main__":
    exit_process(main())
