"""Starts a real, throw-away `redis-server` on a free loopback port (tests, and `make up` when no
Redis URL is configured).

    with RedisServer() as redis:          # or: redis = RedisServer().start(); ...; redis.stop()
        store = MetadataStore(redis.url)

The server runs in a private temporary directory with persistence off (no RDB, no AOF), or, given
`data_dir`, with an append-only file there (fsync'd every second) that a server started again on the
same directory reloads (`make up` restarting its private Redis: the placements survive); either way in a
session of its own (signals to its parent's process group do not reach it), answers PING before
start() returns, and is stopped with SIGTERM (SIGKILL after a timeout) by stop().

Given a `password`, the server requires it (`requirepass`, in a 0600 config file of its directory, so
it is not on any command line): `url` has no credentials (safe to log and print), `auth_url` has them.
"""
from __future__ import annotations

import logging
import os
import pathlib
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.parse

import redis

from common.errors import ConfigError

log = logging.getLogger(__name__)


def _quote(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it). Another process may take it before
    we bind it, so whoever binds must handle failure (RedisServer retries with a new port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class RedisServer:
    """One redis-server child process. Not thread-safe; start and stop from one thread."""

    def __init__(self, *, host: str = "127.0.0.1", port: int | None = None,
                 binary: str = "redis-server", data_dir: str | pathlib.Path | None = None,
                 password: str | None = None) -> None:
        path = shutil.which(binary)
        if path is None:
            raise ConfigError(f"redis: {binary!r} not found on PATH (apt-get install redis-server)")
        self.binary = path
        self.host = host
        self.port = port            # None = a free port, chosen at start()
        self.password = password or None
        self._proc: subprocess.Popen[bytes] | None = None
        self.data_dir = pathlib.Path(data_dir) if data_dir is not None else None   # kept across stop()
        self._dir: pathlib.Path | None = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("redis server not started")
        return f"redis://{self.host}:{self.port}/0"

    @property
    def auth_url(self) -> str:
        """`url` with the password in it (for clients; never log it)."""
        if self.password is None:
            return self.url
        return f"redis://:{urllib.parse.quote(self.password, safe='')}@{self.host}:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def returncode(self) -> int | None:
        """Its exit status once it has exited (None while running or before start)."""
        return None if self._proc is None else self._proc.poll()

    @property
    def log_path(self) -> pathlib.Path | None:
        return None if self._dir is None else self._dir / "redis.log"

    def start(self, timeout_s: float = 10.0, attempts: int = 3) -> "RedisServer":
        """Starts the server and waits until it answers PING. A lost race for a free port is
        retried `attempts` times; other failures raise ConfigError with the server's log tail."""
        if self._proc is not None:
            raise RuntimeError("redis server already started")
        fixed = self.port is not None
        for attempt in range(attempts if not fixed else 1):
            port = self.port if fixed else free_port(self.host)
            if self._try_start(port, timeout_s):
                self.port = port
                log.info("redis-server pid %d on %s", self._proc.pid, self.url)
                return self
            log.warning("redis-server did not start on port %d (attempt %d)", port, attempt + 1)
        message = (f"redis: could not start {self.binary} on {self.host}"
                   f"{':' + str(self.port) if fixed else ''}: {self._log_tail()}")
        self._proc = None
        self._cleanup_dir()
        raise ConfigError(message)

    def _try_start(self, port: int, timeout_s: float) -> bool:
        self._cleanup_dir()
        if self.data_dir is not None:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            self._dir = self.data_dir
            # everysec: a crash loses at most the last second of writes, and no write waits on a disk.
            persistence = ["--appendonly", "yes", "--appendfsync", "everysec"]
        else:
            self._dir = pathlib.Path(tempfile.mkdtemp(prefix="mnemosyne-redis-"))
            persistence = ["--appendonly", "no"]
        conf = self._dir / "redis-auth.conf"
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:        # redis' config syntax: a double-quoted string with escapes
            f.write("" if self.password is None else f'requirepass "{_quote(self.password)}"\n')
        args = [self.binary, str(conf), "--bind", self.host, "--port", str(port), "--dir", str(self._dir),
                "--save", "", *persistence, "--daemonize", "no",
                "--logfile", str(self._dir / "redis.log"), "--databases", "1"]
        # Its own session: a terminal's Ctrl-C (SIGINT to the foreground process group) must not
        # reach it, so whoever started it stops it last (`make up`: after the kvstore, whose
        # pools deregister on the way down).
        self._proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, start_new_session=True)
        client = redis.Redis(host=self.host, port=port, socket_timeout=1.0,
                             socket_connect_timeout=1.0, password=self.password)
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                if self._proc.poll() is not None:           # exited: port taken, bad config...
                    break
                try:
                    # Our process, not another server that already held the port.
                    if client.info("server")["process_id"] == self._proc.pid:
                        return True
                except redis.exceptions.ConnectionError:
                    pass
                except redis.exceptions.ResponseError as e:
                    if "LOADING" not in str(e):
                        raise
                time.sleep(0.02)
        finally:
            client.close()
        self._kill()
        return False

    def stop(self, timeout_s: float = 5.0) -> None:
        """SIGTERM (redis exits cleanly, flushing its append-only file if it has one), SIGKILL after
        timeout_s. Idempotent."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("redis-server pid %d ignored SIGTERM; killing", self._proc.pid)
                self._kill()
        self._proc = None
        self._cleanup_dir()

    def kill(self) -> None:
        """SIGKILL, without waiting for it to exit (safe in a signal handler); stop() reaps it."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()

    def _kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()

    def _log_tail(self) -> str:
        try:
            lines = (self._dir / "redis.log").read_text().strip().splitlines()
            return " | ".join(lines[-3:]) or "(empty log)"
        except (OSError, TypeError):
            return "(no log)"

    def _cleanup_dir(self) -> None:
        if self._dir is not None and self._dir != self.data_dir:
            shutil.rmtree(self._dir, ignore_errors=True)
        self._dir = None

    def __enter__(self) -> "RedisServer":
        return self if self._proc is not None else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
