"""`gigamamba bench scan`: the per-kernel breakdown's naming and sums (the profiling itself needs CUDA)."""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import torch

from gigamamba.ops import bench

CUDA, CPU = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU


def test_kernel_label_keeps_template_arguments_and_drops_the_signature():
    assert bench.kernel_label("void scan2d::fwd_tile_kernel<float, 4>(scan2d::Params)") == \
        "scan2d::fwd_tile_kernel<float, 4>"
    # a "(" inside template arguments is not the parameter list
    assert bench.kernel_label("void k<(int)3, f(x)>(int, float*)") == "k<(int)3, f(x)>"
    assert bench.kernel_label("Memset (Device)") == "Memset"
    # "(anonymous namespace)" is part of the name, not its parameter list
    assert bench.kernel_label("void at::native::(anonymous namespace)::CatArrayBatchedCopy<float, 4>(int*, long)") \
        == "at::native::(anonymous namespace)::CatArrayBatchedCopy<float, 4>"
    assert bench.kernel_label("void (anonymous namespace)::softmax_warp_forward<float, 5>(float*)") == \
        "(anonymous namespace)::softmax_warp_forward<float, 5>"
    assert bench.kernel_label("ampere_sgemm_128x64_nn") == "ampere_sgemm_128x64_nn"
    long = "void at::native::vectorized_elementwise_kernel<4, " + "A" * 100 + ">(int)"
    assert len(bench.kernel_label(long)) == 70 and bench.kernel_label(long).endswith("...")


def test_per_kernel_ms_sums_device_time_per_call_and_sorts():
    ev = lambda name, us, dev=CUDA: SimpleNamespace(name=name, device_type=dev, device_time_total=us)
    events = [
        ev("void scan2d::bwd_final_kernel<float, true>(scan2d::Params)", 8000.0),
        ev("void scan2d::bwd_final_kernel<float, true>(scan2d::Params)", 8200.0),
        ev("void scan2d::fwd_tile_kernel<float, 4>(scan2d::Params)", 3400.0),
        ev("aten::add_", 99999.0, CPU),  # host-side op: not a kernel
    ]
    out = bench.per_kernel_ms(events, calls=2)
    assert list(out) == ["scan2d::bwd_final_kernel<float, true>", "scan2d::fwd_tile_kernel<float, 4>"]
    assert out["scan2d::bwd_final_kernel<float, true>"] == (8000.0 + 8200.0) / 1e3 / 2
    assert out["scan2d::fwd_tile_kernel<float, 4>"] == 1.7


def test_bench_scan_kernels_flag_on_cpu_says_it_needs_cuda(capsys):
    parser = argparse.ArgumentParser()
    bench.configure(parser)
    args = parser.parse_args(["--device", "cpu", "--sizes", "1:8x8", "-D", "4", "-N", "2", "--impls", "torch",
                              "--iters", "2", "--warmup", "0", "--kernels"])
    assert bench.run(args) == 0
    out = capsys.readouterr().out
    assert "| 8x8 | 1 | fp32 | torch |" in out
    assert "needs CUDA" in out


def test_bench_scan_refuses_an_unknown_implementation(capsys):
    """A misspelt or removed name (cuda-blocked) must not time the default kernel under its label."""
    parser = argparse.ArgumentParser()
    bench.configure(parser)
    args = parser.parse_args(["--device", "cpu", "--sizes", "1:8x8", "-D", "4", "-N", "2",
                              "--impls", "torch,cuda-blocked", "--iters", "2", "--warmup", "0"])
    assert bench.run(args) == 2
    captured = capsys.readouterr()
    assert "--impls cuda-blocked unknown" in captured.err and "| torch |" not in captured.out
