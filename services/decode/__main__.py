"""`python -m services.decode --kvstore HOST:PORT [--model ...] [--kvp 2 --kvp-tokens M] ...` (see --help).

Prints "decode listening on HOST:PORT" once registered and serving; SIGTERM or SIGINT stop it
gracefully (leave the kvstore, drain RPCs, stop the grid).
"""
from __future__ import annotations

import asyncio
import logging
import sys

from common.errors import MnemosyneError
from common.rpc.server import serve_until_signal
from services.decode.config import DecodeConfig


async def _main(config: DecodeConfig) -> None:
    from services.decode.service import DecodeService
    svc = await DecodeService.start(config)
    print(f"decode listening on {svc.address} (instance {svc.instance.instance_id})", flush=True)
    if svc.metrics_server is not None:
        print(f"decode metrics on {svc.metrics_server.url}", flush=True)
    await serve_until_signal(svc.server, cleanup=svc.stop)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = DecodeConfig.from_args(argv)
        import torch
        torch.set_num_threads(config.threads)
        asyncio.run(_main(config))
    except MnemosyneError as e:
        logging.getLogger("decode").error("%s", e)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
