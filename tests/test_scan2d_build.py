"""The CUDA scan2d extension compiles wherever nvcc exists (CI included, no GPU needed), and without
nvcc the op falls back with one clear warning."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from gigamamba.ops import scan2d_cuda

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(scan2d_cuda.cuda_home() is None, reason="nvcc (CUDA compiler) not found")
def test_extension_compiles(tmp_path):
    # A fresh build directory, so the sources as they are now are compiled (one compile per session).
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"), PYTHONPATH=str(ROOT))
    if not torch.cuda.is_available():
        env.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")  # no GPU to detect: compile for Hopper
    proc = subprocess.run(
        [sys.executable, "-m", "gigamamba.cli", "build-ext", "--quiet"],
        capture_output=True, text=True, env=env, timeout=1800, cwd=ROOT,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    assert "build-ext: built" in proc.stdout
    assert "build-ext: C++ compiler " in proc.stdout and "was built with" in proc.stdout  # the ABI suspects, named
    built = list((tmp_path / "ext").rglob("gigamamba_scan2d*.so"))
    assert built, "no shared object was produced"


def test_no_nvcc_warns_once_and_falls_back(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(scan2d_cuda, "cuda_home", lambda: None)
    monkeypatch.setattr(scan2d_cuda, "_ext", None)
    monkeypatch.setattr(scan2d_cuda, "_failed", None)
    monkeypatch.setattr(scan2d_cuda, "_warned", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert scan2d_cuda.available() is False
        assert scan2d_cuda.available() is False
    msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 1, msgs
    assert "nvcc" in msgs[0] and "PyTorch path" in msgs[0]


def test_cpu_tensors_use_the_pytorch_path():
    from gigamamba.ops.scan2d import scan2d, scan2d_torch

    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, (1,))))
    u, delta, z = (torch.randn(1, 3, 5, 6, generator=g) for _ in range(3))
    A = -torch.rand(3, 2, generator=g) - 0.5
    B, C = (torch.randn(1, 2, 5, 6, generator=g) for _ in range(2))
    assert torch.equal(scan2d(u, delta, A, B, C, z=z), scan2d_torch(u, delta, A, B, C, z=z))


def test_compiler_report_names_both_compilers(monkeypatch):
    """build-ext's first line: which compiler builds the extension and which built torch, so that a mismatch on
    an unfamiliar machine shows at once."""
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    line = scan2d_cuda.compiler_report()
    assert line.startswith("C++ compiler no-such-compiler-here (not on PATH, "), line
    assert "ABI check FAILED" in line or "version unknown" in line, line  # torch says 0.0.0, or raises
    assert f"torch {torch.__version__} was built with " in line
    if shutil.which("g++"):
        monkeypatch.setenv("CXX", "g++")
        line = scan2d_cuda.compiler_report()
        assert "g++ (/" in line and "torch's ABI check" in line, line
