"""Starting a gigamamba module in a fresh interpreter (the encoder check, the ingest bench's pipeline)."""

from __future__ import annotations

import os
import sys


def python_module(module: str, *args: str) -> tuple[list[str], dict]:
    """argv and environment for `python -P -m module args...` that imports what this interpreter imports.

    The child sees this interpreter's sys.path ('' is the working directory), as multiprocessing's spawn would
    give it; -P keeps the working directory from going ahead of it too, as a bare `python -m` would put it (a
    stray ray.py there would shadow Ray).
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p or os.getcwd() for p in sys.path if os.pathsep not in p)
    return [sys.executable, "-P", "-m", module, *args], env
