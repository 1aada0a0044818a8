"""Writes the long-context TEST model (random weights; common/model/random_hf.py) into a directory:

    .venv/bin/python scripts/make_test_model.py DIR [--seed S]     # = mnemosyne make-test-model DIR
    make up ARGS="--model DIR --max-model-len 262144 --decode-kvp 4"
"""
from __future__ import annotations

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from common.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["make-test-model", *sys.argv[1:]]))
