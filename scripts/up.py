"""`make up`: the whole disaggregated deployment on loopback, one process per service.

    .venv/bin/python scripts/up.py [--kv-backend tcp|nixl] [--port 50051] [--model DIR|FILE] ...

Starts, in order: Redis (a private redis-server unless --redis-url), the kvstore, one prefill instance
(spp = 2) and one decode instance (kvp = 2) side by side, and the router on 127.0.0.1:50051, serving
the built-in model unless --model says otherwise. Prints where each service listens and where its
log is, then waits; Ctrl-C (SIGINT) or SIGTERM stops them all, router first, Redis last.

The `Cluster` class is also what the end-to-end tests start (tests/integration/test_services_e2e.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import logging
import os
import pathlib
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from common.errors import ConfigError  # noqa: E402
from common.metadata.redis_server import RedisServer  # noqa: E402

log = logging.getLogger("up")
LISTENING = re.compile(r"^(\w+) listening on (\S+)", re.M)
METRICS = re.compile(r"^(\w+) metrics on (\S+)", re.M)
TARGETS_DIR = ROOT / "deploy" / "prometheus" / "targets"


def default_kv_backend() -> str:
    """NIXL when its wheel is installed (it runs over UCX on loopback too), else TCP."""
    return "nixl" if importlib.util.find_spec("nixl_cu12") or importlib.util.find_spec("nixl") else "tcp"


@dataclass(frozen=True)
class ClusterConfig:
    model: str | None = None                 # None = the built-in model
    kv_backend: str = field(default_factory=default_kv_backend)
    host: str = "127.0.0.1"
    router_port: int = 50051                 # 0 = a free one
    redis_url: str = ""                      # "" = start a private redis-server
    deployment: str = "default"              # key prefix in Redis
    prefill_spp: int = 2
    decode_kvp: int = 2
    kvp_tokens: int = 4096                   # tokens per decode KVP group (M)
    block_size: int = 16
    decode_kv_tokens: int = 8192             # KV capacity of each decode KVP group, tokens
    prefill_kv_tokens: int = 8192
    chunk_size: int = 512
    short_prompt_tokens: int = 256
    max_model_len: int | None = None
    dtype: str = "float32"
    threads: int = 1                         # torch threads per process
    lease_s: float = 10.0
    kv_timeout_s: float = 60.0
    start_timeout_s: float = 300.0
    log_dir: str = ""                        # "" = a new temporary directory
    admission: bool = True                   # the router's SLO-aware admission
    extra: dict = field(default_factory=dict)   # service name -> extra flags


@dataclass
class Service:
    name: str
    proc: subprocess.Popen
    log_path: pathlib.Path
    address: str = ""
    metrics_url: str = ""                    # its /metrics endpoint (printed at start)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


class Cluster:
    """The processes of one deployment. Not thread-safe; start and stop from one thread.

        with Cluster(ClusterConfig(router_port=0)) as c:
            c.router_address, c.services["decode"].pid, ...
    """

    def __init__(self, config: ClusterConfig) -> None:
        self.config = config
        self.redis: RedisServer | None = None
        self.redis_url = config.redis_url
        self.services: dict[str, Service] = {}
        self.log_dir = pathlib.Path(config.log_dir or tempfile.mkdtemp(prefix="mnemosyne-up-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)

    @property
    def router_address(self) -> str:
        return self.services["router"].address

    @property
    def kvstore_address(self) -> str:
        return self.services["kvstore"].address

    @property
    def metrics_urls(self) -> dict[str, str]:
        """Service name -> its /metrics URL."""
        return {n: s.metrics_url for n, s in self.services.items() if s.metrics_url}

    def write_targets(self, directory: pathlib.Path = TARGETS_DIR) -> pathlib.Path:
        """Writes <deployment>.json (Prometheus file_sd) listing every service's /metrics, for a
        local Prometheus run with deploy/prometheus/prometheus.yml."""
        targets = [u.removeprefix("http://").removesuffix("/metrics") for u in self.metrics_urls.values()]
        path = directory / f"{self.config.deployment}.json"
        directory.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps([{"targets": targets, "labels": {"deployment": self.config.deployment}}],
                                   indent=2) + "\n")
        return path

    # ---- start -------------------------------------------------------------------------------
    def start(self) -> "Cluster":
        try:
            if not self.redis_url:
                self.redis = RedisServer(host=self.config.host).start()
                self.redis_url = self.redis.url
            self._wait(self._spawn("kvstore", self._kvstore_args()))
            # The two engines load side by side.
            engines = [self._spawn("prefill", self._engine_args("prefill")),
                       self._spawn("decode", self._engine_args("decode"))]
            for svc in engines:
                self._wait(svc)
            self._wait(self._spawn("router", self._router_args()))
        except BaseException:
            self.stop()
            raise
        return self

    def restart(self, name: str) -> Service:
        """Starts service `name` again (after it died or was killed), with the same arguments."""
        old = self.services[name]
        if old.proc.poll() is None:
            raise RuntimeError(f"{name} (pid {old.pid}) is still running")
        args = {"kvstore": self._kvstore_args, "router": self._router_args}.get(
            name, lambda: self._engine_args(name))()
        old.log_path.rename(old.log_path.with_suffix(f".{old.pid}.log"))
        svc = self._spawn(name, args)
        self._wait(svc)
        return svc

    def _kvstore_args(self) -> list[str]:
        c = self.config
        return ["--host", c.host, "--port", "0", "--redis-url", self.redis_url, "--deployment", c.deployment,
                "--lease-s", str(c.lease_s), "--instance-ttl-s", str(max(3.0, c.lease_s)),
                "--reap-interval-s", "0.2", "--grace-s", "2"]

    def _engine_args(self, role: str) -> list[str]:
        c = self.config
        args = ["--kvstore", self.kvstore_address, "--host", c.host, "--port", "0", "--dtype", c.dtype,
                "--block-size", str(c.block_size), "--chunk-size", str(c.chunk_size), "--kv-backend", c.kv_backend,
                "--kv-host", c.host, "--threads", str(c.threads), "--kv-timeout-s", str(c.kv_timeout_s),
                "--grace-s", "2", "--deployment", c.deployment]
        if c.model:
            args += ["--model", c.model]
        if c.max_model_len:
            args += ["--max-model-len", str(c.max_model_len)]
        if role == "prefill":
            args += ["--spp", str(c.prefill_spp), "--max-kv-tokens", str(c.prefill_kv_tokens)]
        else:
            args += ["--max-kv-tokens", str(c.decode_kv_tokens)]
            if c.decode_kvp > 1:
                args += ["--kvp", str(c.decode_kvp), "--kvp-tokens", str(c.kvp_tokens)]
        return args

    def _router_args(self) -> list[str]:
        c = self.config
        args = ["--kvstore", self.kvstore_address, "--host", c.host, "--port", str(c.router_port),
                "--short-prompt-tokens", str(c.short_prompt_tokens), "--grace-s", "2",
                "--deployment", c.deployment]
        if not c.admission:
            args.append("--no-admission")
        if c.model:
            args += ["--model", c.model]
        if c.max_model_len:
            args += ["--max-model-len", str(c.max_model_len)]
        return args

    def _spawn(self, name: str, args: list[str]) -> Service:
        args = args + list(self.config.extra.get(name, ()))
        log_path = self.log_dir / f"{name}.log"
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(self.config.threads)}
        with open(log_path, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", f"services.{name}", *args], cwd=ROOT, env=env,
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)    # Ctrl-C reaches up.py only; it stops them in order
        svc = Service(name, proc, log_path)
        self.services[name] = svc
        return svc

    def _wait(self, svc: Service) -> None:
        deadline = time.monotonic() + self.config.start_timeout_s
        while time.monotonic() < deadline:
            text = svc.log_path.read_text(errors="replace")
            m = LISTENING.search(text)
            if m:
                svc.address = m.group(2)
                metrics = METRICS.search(text)      # printed right after (unless --metrics-port -1)
                for _ in range(20):
                    if metrics is not None or "--metrics-port" in self.config.extra.get(svc.name, ()):
                        break
                    time.sleep(0.1)
                    metrics = METRICS.search(svc.log_path.read_text(errors="replace"))
                svc.metrics_url = metrics.group(2) if metrics else ""
                return
            if svc.proc.poll() is not None:
                raise ConfigError(f"{svc.name} exited with code {svc.proc.returncode} while starting:\n"
                                  f"{svc.log_tail()}")
            time.sleep(0.1)
        raise ConfigError(f"{svc.name} did not start within {self.config.start_timeout_s:.0f} s:\n{svc.log_tail()}")

    # ---- stop --------------------------------------------------------------------------------
    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM to the router, then to both engines, then to the kvstore (an engine leaves the
        kvstore first, then drains), SIGKILL after timeout_s; then Redis. Idempotent."""
        for stage in (("router",), ("prefill", "decode"), ("kvstore",)):
            running = [self.services[n] for n in stage if n in self.services
                       and self.services[n].proc.poll() is None]
            for svc in running:
                svc.proc.terminate()
            for svc in running:
                try:
                    svc.proc.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    log.warning("%s (pid %d) ignored SIGTERM; killing it", svc.name, svc.pid)
                    os.killpg(svc.pid, signal.SIGKILL)
                    svc.proc.wait(5)
        for svc in self.services.values():        # grid workers left behind by a killed driver
            try:
                os.killpg(svc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if self.redis is not None:
            self.redis.stop()
            self.redis = None

    def __enter__(self) -> "Cluster":
        return self if self.services else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---- make up ----------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> ClusterConfig:
    d = ClusterConfig()
    p = argparse.ArgumentParser(prog="make up", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="HF directory or .gguf file (default: the built-in model)")
    p.add_argument("--kv-backend", choices=("tcp", "nixl"), default=d.kv_backend,
                   help=f"KV transfer backend (default here: {d.kv_backend})")
    p.add_argument("--port", type=int, default=d.router_port, help="router port (default: 50051)")
    p.add_argument("--redis-url", default="", help="use this Redis instead of starting one")
    p.add_argument("--spp", type=int, default=d.prefill_spp, help="prefill pipeline stages (default: 2)")
    p.add_argument("--kvp", type=int, default=d.decode_kvp, help="decode KVP groups (default: 2)")
    p.add_argument("--kvp-tokens", type=int, default=d.kvp_tokens, help="tokens per decode KVP group")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=d.dtype)
    p.add_argument("--threads", type=int, default=d.threads, help="torch threads per process")
    p.add_argument("--log-dir", default="", help="where the services' logs go (default: a temp dir)")
    a = p.parse_args(argv)
    return dataclasses.replace(d, model=a.model, kv_backend=a.kv_backend, router_port=a.port,
                               redis_url=a.redis_url, prefill_spp=a.spp, decode_kvp=a.kvp,
                               kvp_tokens=a.kvp_tokens, decode_kv_tokens=max(d.decode_kv_tokens, a.kvp_tokens),
                               dtype=a.dtype, threads=a.threads, log_dir=a.log_dir)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="up: %(message)s")
    config = parse_args(argv)
    stop = False

    def on_signal(signum, frame):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    cluster = Cluster(config)
    print(f"Starting Mnemosyne on loopback (KV over {config.kv_backend}; logs in {cluster.log_dir}) ...",
          flush=True)
    try:
        cluster.start()
    except ConfigError as e:
        print(f"up: {e}", file=sys.stderr)
        return 1
    try:
        print(f"  redis    {cluster.redis_url}")
        for name, what in (("kvstore", "placement + leases"),
                           ("prefill", f"spp={config.prefill_spp}"),
                           ("decode", f"kvp={config.decode_kvp}, {config.kvp_tokens} tokens per group"),
                           ("router", "the public API")):
            svc = cluster.services[name]
            print(f"  {name:<8} {svc.address:<22} pid {svc.pid:<7} {what}")
        for name, url in cluster.metrics_urls.items():
            print(f"  {name:<8} metrics {url}")
        try:
            print(f"  Prometheus targets: {cluster.write_targets()} (prometheus "
                  f"--config.file=deploy/prometheus/prometheus.yml)")
        except OSError as e:
            print(f"up: cannot write the Prometheus targets: {e}", file=sys.stderr)
        print(f"\nReady. Try:\n  .venv/bin/python -m common.cli generate --server {cluster.router_address} "
              f"--prompt 'What is the capital of France?' --chat\nCtrl-C stops everything.", flush=True)
        while not stop:
            for svc in cluster.services.values():
                if svc.proc.poll() is not None:
                    print(f"up: {svc.name} exited with code {svc.proc.returncode}; stopping "
                          f"(log: {svc.log_path})", file=sys.stderr)
                    stop = True
            time.sleep(0.3)
    finally:
        print("\nStopping ...", flush=True)
        cluster.stop()
        print("All stopped.", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
