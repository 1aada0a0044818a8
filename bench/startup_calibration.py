"""How long a pool calibrating its performance model at start takes (perf_model="calibrate",
profile.STARTUP_SPEC) with the built-in model, on 1x1x1, spp=2 and kvp=2; each in an empty cache.

    python -m bench.startup_calibration        # writes bench/results/startup_calibration.json
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from common.config import EngineConfig, ParallelConfig, SchedulerConfig

LAYOUTS = {"1x1x1": ParallelConfig(), "spp2": ParallelConfig(spp=2),
           "kvp2": ParallelConfig(kvp=2, kvp_tokens=1024)}


def main() -> None:
    import torch
    torch.set_num_threads(1)
    from common.engine.engine import make_engine
    out = {"cpus": os.cpu_count(), "note": "shared 2-core machine; other sessions ran tests meanwhile", "runs": {}}
    for name, par in LAYOUTS.items():
        with tempfile.TemporaryDirectory() as cache:
            os.environ["MNEMOSYNE_CACHE"] = cache
            cfg = EngineConfig(perf_model="calibrate", parallel=par,
                               scheduler=SchedulerConfig(policy="lars", chunking="adaptive"))
            t0 = time.monotonic()
            engine = make_engine(cfg, threads_per_worker=1)
            total = time.monotonic() - t0
            fit = engine.perf_model.base.fit_info
            engine.shutdown()
        out["runs"][name] = {"engine_start_s": round(total, 1), "profile_s": fit["profile_seconds"],
                             "held_out_median_rel_err": round(fit["held_out_median_rel_err"], 3)}
        print(name, out["runs"][name], flush=True)
    Path(__file__).with_name("results").joinpath("startup_calibration.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
