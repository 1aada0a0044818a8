"""Model shards as they serve on the CPU (loaded, cast, packed), kept in files and mapped.

Building a stage of the built-in model on this machine costs ~0.4 s to read and slice the checkpoint
and ~0.5 s to cast and pack it (q/k/v and gate/up fused, float32 weights stored transposed), in every
grid worker: about 1 s of each start and of each rebuild after a lost worker (bench/results/faults.md).
With the cache, the first build of a shard saves its packed tensors once (torch.save keeps the views
of a fused matrix as views of one storage) and every build of the same shard maps the file instead
(`torch.load(mmap=True)`, ~0.04 s): a rebuilt grid, a restarted instance, and the grid's other ranks
of the same shard (KVP groups hold the same weights) start without loading, and the mapped pages are
the page cache's, shared by every process that maps them instead of copied into each.

A file is named by everything its tensors depend on: the checkpoint's files (path, size, mtime), the
model config (less max_position, which no weight depends on), the layers, the TP shard, the dtype and
the layout (FORMAT, and whether float32 weights are stored transposed). It is written to a temporary
file and renamed, by one process at a time (a lock file; a lock left by a dead process is taken
over), so a reader never maps a partial file; a file that fails to load is removed and the shard
built again. The directory keeps the most recently used files up to MAX_BYTES (oldest removed
first); a shard larger than that is not cached.

Mapped pages are copy-on-write (MAP_PRIVATE): nothing writes to weights, and a write would only make
a private copy, never change the file.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from common.config import ModelConfig

log = logging.getLogger(__name__)

FORMAT = "packed-v1"                 # bump when the packed layout (LlamaModel.pack_weights) changes
MAX_BYTES = 8 << 30                  # the directory's size cap (least recently used files removed)
STALE_LOCK_S = 600.0                 # a lock older than this is taken over even when its pid lives


def cache_dir() -> Path:
    """$MNEMOSYNE_CACHE/packed (default ~/.cache/mnemosyne/packed), beside the GGUF dequantization
    cache."""
    from common.model.gguf_loader import default_cache_dir
    return default_cache_dir() / "packed"


def source_identity(source: str) -> list:
    """The checkpoint's files as (name, size, mtime_ns): changes when any of them is replaced."""
    p = Path(source)
    files = sorted(f for f in p.iterdir() if f.is_file()) if p.is_dir() else [p]
    out = []
    for f in files:
        st = f.stat()
        out.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
    return out


def shard_key(source: str, cfg: ModelConfig, dtype: torch.dtype, first_layer: int, last_layer: int,
              shard: object = None, transposed: bool = False) -> str:
    """The name of a shard's file: a hash of everything its tensors depend on (`transposed`: the
    weights' storage, LlamaModel.pack_weights; it depends on whether the CPU decode kernel runs)."""
    config = dataclasses.asdict(cfg)
    config.pop("max_position", None)
    raw = json.dumps({"format": FORMAT, "source": source_identity(source), "config": config,
                      "dtype": str(dtype), "layers": [first_layer, last_layer], "transposed": transposed,
                      "shard": dataclasses.asdict(shard) if shard is not None else None},
                     sort_keys=True, default=str)
    return hashlib.sha256(raw.encode()).hexdigest()[:24]


class PackedCache:
    def __init__(self, directory: Path | None = None, max_bytes: int = MAX_BYTES) -> None:
        self.dir = Path(directory) if directory is not None else cache_dir()
        self.max_bytes = max_bytes

    def path(self, key: str) -> Path:
        return self.dir / f"{key}.pt"

    def model(self, key: str, build: Callable[[], nn.Module], empty: Callable[[], nn.Module]) -> nn.Module:
        """The shard `key`: mapped from its file when there is one, else `build()` (loaded, cast and
        packed), saved, and mapped from the file just written (so this process shares its pages too).
        `empty()` builds the same modules on the meta device, the tensors to be assigned from the file."""
        model = self._load(key, empty)
        if model is not None:
            return model
        model = build()
        if self._save(key, model):
            mapped = self._load(key, empty)
            if mapped is not None:
                return mapped
        return model

    # ---- files ---------------------------------------------------------------------------------
    def _load(self, key: str, empty: Callable[[], nn.Module]) -> nn.Module | None:
        path = self.path(key)
        if not path.exists():
            return None
        t0 = time.monotonic()
        try:
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            model = empty()
            model.load_state_dict(state, strict=True, assign=True)
            model.adopt_packed()
        except Exception as e:                 # a corrupt or foreign file: built again, not trusted
            log.warning("packed weights %s unusable (%s: %s): removed, building the shard again", path,
                        type(e).__name__, e)
            _unlink(path)
            return None
        try:
            os.utime(path)                      # recently used: the last to be evicted
        except OSError:
            pass
        log.info("model shard mapped from %s in %.2f s", path, time.monotonic() - t0)
        return model.eval()

    def _save(self, key: str, model: nn.Module) -> bool:
        """Writes the shard's file unless another process is writing it (then False: this process
        keeps its own copy) or it is larger than the cache may hold. Failures are logged, not raised."""
        state = model.state_dict()
        size = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in state.values()}.values())
        if size > self.max_bytes:
            log.info("model shard of %d MiB not cached (over the cache's %d MiB)", size >> 20, self.max_bytes >> 20)
            return False
        path = self.path(key)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            log.warning("packed weights not cached: %s", e)
            return False
        lock = self.dir / f".{key}.lock"
        if not _take_lock(lock):
            return False
        tmp = self.dir / f".{key}.{os.getpid()}.tmp"
        t0 = time.monotonic()
        try:
            if path.exists():                   # written by another process since _load looked
                return True
            self._evict(keep=size)
            torch.save(state, tmp)
            os.replace(tmp, path)
            log.info("model shard (%d MiB) saved to %s in %.2f s", size >> 20, path, time.monotonic() - t0)
            return True
        except (OSError, RuntimeError) as e:    # a full disk, a read-only directory
            log.warning("packed weights not cached: %s", e)
            return False
        finally:
            _unlink(tmp)
            _unlink(lock)

    def _evict(self, keep: int) -> None:
        """Removes the least recently used files until `keep` more bytes fit under max_bytes."""
        try:
            files = sorted((f for f in self.dir.glob("*.pt")), key=lambda f: f.stat().st_mtime)
            total = sum(f.stat().st_size for f in files)
        except OSError:
            return
        for f in files:
            if total + keep <= self.max_bytes:
                break
            total -= f.stat().st_size
            _unlink(f)                          # a process mapping it keeps its pages until it exits
            log.info("packed weights %s evicted (cache over %d MiB)", f, self.max_bytes >> 20)


def _take_lock(lock: Path) -> bool:
    """Creates `lock` holding this pid; takes over one whose process is gone or that is stale."""
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                pid = int(lock.read_text() or 0)
                age = time.time() - lock.stat().st_mtime
            except (OSError, ValueError):
                pid, age = 0, 0.0
            if pid and _alive(pid) and age < STALE_LOCK_S:
                return False
            _unlink(lock)
            continue
        except OSError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return True
    return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass
