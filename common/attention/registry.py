"""Attention backends by name."""
from __future__ import annotations

import torch

from common.attention.base import AttentionBackend
from common.errors import ConfigError

BACKENDS = ("auto", "reference", "cpu_flash", "cuda")


def get_backend(name: str = "auto", device: str | torch.device = "cpu") -> AttentionBackend:
    """Return a backend: "reference", "cpu_flash", "cuda", or "auto" (cpu_flash on CPU, cuda on CUDA).

    Raises ConfigError for an unknown name or device, or when the CUDA backend cannot be imported.
    """
    if name == "auto":
        try:
            kind = torch.device(device).type
        except RuntimeError as e:
            raise ConfigError(f"invalid device {str(device)!r} for attention backend 'auto'") from e
        if kind == "cpu":
            name = "cpu_flash"
        elif kind == "cuda":
            name = "cuda"
        else:
            raise ConfigError(f"attention backend 'auto' has no choice for device {str(device)!r}; "
                              f"name one of {BACKENDS[1:]}")
    if name == "reference":
        from common.attention.reference import ReferenceBackend
        return ReferenceBackend()
    if name == "cpu_flash":
        from common.attention.cpu import CpuFlashBackend
        return CpuFlashBackend()
    if name == "cuda":
        try:
            from common.attention.cuda import CudaAttentionBackend
        except ImportError as e:
            raise ConfigError(f"attention backend 'cuda' is not available: {e}") from e
        return CudaAttentionBackend()
    raise ConfigError(f"unknown attention backend {name!r}; choose one of {BACKENDS}")
