"""`gigamamba bench scan`: the 2D selective scan, oracle vs the PyTorch path vs the CUDA kernel.

For each case: fwd ms and fwd+bwd ms (CUDA events after warm-up, median of many runs, inputs drawn
fresh from randn and rotated among several sets), the fewest bytes each must move (every input read
once, every output written once) as GB/s and as a floor in ms at the device-to-device copy bandwidth
measured in the same run, the speedup over the PyTorch path, and the peak extra memory of one call.
The oracle (`scan2d_ref`, loops) runs only on tiny grids. On CPU it runs with small sizes (`--sizes`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GPU_CASES = "1:16x16,1:64x64,1:200x200,1:489x415,8:100x100"
CPU_CASES = "1:16x16,1:32x32"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", default=None,
                        help=f"cases as B:HxW, comma-separated (default on CUDA {GPU_CASES}; on CPU {CPU_CASES})")
    parser.add_argument("--channels", "-D", type=int, default=None, help="D (default 256 on CUDA, 32 on CPU)")
    parser.add_argument("--state", "-N", type=int, default=16, help="N, states per channel")
    parser.add_argument("--dtypes", default=None, help="comma-separated of fp32,bf16,fp16 (default fp32,bf16 on CUDA)")
    parser.add_argument("--impls", default="ref,torch,cuda", help=f"which of {','.join(IMPLS)} to time (cuda-passes: the kernel with carries by separate passes)")
    parser.add_argument("--oracle-max-cells", type=int, default=256, help="run the loop oracle only up to H*W cells")
    parser.add_argument("--iters", type=int, default=50, help="timed runs per measurement (median)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--budget", type=float, default=3.0, help="stop timing a measurement after this many s")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    parser.add_argument("--kernels", action="store_true",
                        help="also give each CUDA case's fwd+bwd time per GPU kernel (torch.profiler over 5 calls): "
                             "which pass a kernel change moved")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")


def _parse_cases(text: str):
    cases = []
    for item in text.split(","):
        b, _, hw = item.strip().partition(":")
        if not hw:
            b, hw = "1", b
        h, w = hw.lower().split("x")
        cases.append((int(b), int(h), int(w)))
    return cases


class _Timer:
    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def measure(self, fn, inputs, iters, warmup, budget, min_runs=3):
        """Median ms of fn(inputs[k]) over up to `iters` runs, rotating among the input sets."""
        for k in range(warmup):
            fn(inputs[k % len(inputs)])
        self.sync()
        times = []
        start_all = time.perf_counter()
        for k in range(iters):
            x = inputs[k % len(inputs)]
            if self.cuda:
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn(x)
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b))
            else:
                t0 = time.perf_counter()
                fn(x)
                times.append((time.perf_counter() - t0) * 1e3)
            if time.perf_counter() - start_all > budget and len(times) >= min_runs:
                break
        return statistics.median(times), len(times)


def copy_bandwidth(device, timer) -> float:
    """Device-to-device copy GB/s, counting bytes read plus written."""
    n = (1 << 28) if device.type == "cuda" else (1 << 24)
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    ms, _ = timer.measure(lambda _: dst.copy_(src), [None], 20, 3, 2.0)
    del src, dst
    return 2 * n * 4 / (ms * 1e-3) / 1e9


def _inputs(b, d, n, h, w, dtype, device, grad, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)

    def r(*s, scale=1.0, shift=0.0):
        return (torch.randn(*s, generator=g) * scale + shift).to(device)

    x = dict(
        u=r(b, d, h, w).to(dtype),
        delta=r(b, d, h, w, scale=0.5, shift=-1.0).to(dtype),
        A=-torch.exp(r(d, n, scale=0.5)),
        B=r(b, n, h, w).to(dtype),
        C=r(b, n, h, w).to(dtype),
        D=r(d),
        z=r(b, d, h, w).to(dtype),
        delta_bias=r(d, scale=0.1),
    )
    if grad:
        for v in x.values():
            v.requires_grad_(True)
    x["dout"] = r(b, d, h, w).to(dtype)
    return x


IMPLS = ("ref", "torch", "cuda", "cuda-passes")


def _impl(name):
    if name == "ref":
        from gigamamba.ops.scan2d_ref import scan2d_ref

        return scan2d_ref
    if name == "torch":
        from gigamamba.ops.scan2d import scan2d_torch

        return scan2d_torch
    from gigamamba.ops import scan2d_cuda

    if name == "cuda-passes":  # the multi-pass carry layout the wavefront replaced, for a same-run comparison
        def passes_layout(*a):
            old, scan2d_cuda.CARRIES = scan2d_cuda.CARRIES, "passes"
            try:
                return scan2d_cuda.scan2d_cuda(*a)
            finally:
                scan2d_cuda.CARRIES = old

        return passes_layout
    return scan2d_cuda.scan2d_cuda


def _call(fn, x):
    return fn(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"], True, None)


def _min_bytes(b, d, n, h, w, elt):
    cells = h * w
    fwd = (4 * b * d + 2 * b * n) * cells * elt  # u, delta, z, B, C in; out
    bwd = (7 * b * d + 4 * b * n) * cells * elt  # u, delta, z, dout, B, C in; du, ddelta, dz, dB, dC out
    return fwd, fwd + bwd


def _peak_extra(fn, device, timer) -> float | None:
    if device.type != "cuda":
        return None
    timer.sync()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    timer.sync()
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def kernel_label(name: str) -> str:
    """A profiler kernel name without its return type and parameter list, template arguments kept
    (`fwd_tile_kernel<float, 4>` is the wavefront forward, `<float, 3>` backward's dz pass)."""
    name = name.strip()
    if name.startswith("void "):
        name = name[5:]
    if name.endswith(")"):  # the parameter list is the last balanced (...): a name may hold
        depth = 0           # "(anonymous namespace)" or a "(" inside template arguments before it
        for k in range(len(name) - 1, -1, -1):
            depth += {")": 1, "(": -1}.get(name[k], 0)
            if depth == 0:
                name = name[:k].rstrip() or name
                break
    return name if len(name) <= 70 else name[:67] + "..."


def per_kernel_ms(events, calls: int) -> dict[str, float]:
    """Device ms per call of each GPU kernel, largest first, from profiler events over `calls` calls."""
    totals: dict[str, float] = {}
    for e in events:
        if e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        label = kernel_label(e.name)
        totals[label] = totals.get(label, 0.0) + e.device_time_total / 1e3 / calls
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def kernel_breakdown(fn, x, calls: int = 5) -> dict[str, float]:
    """fn(x) under torch.profiler (after one untraced call): device ms per call, per kernel."""
    from torch.profiler import ProfilerActivity, profile

    fn(x)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn(x)
        torch.cuda.synchronize()
    return per_kernel_ms(prof.events(), calls)


def bench_case(impl, b, h, w, d, n, dtype, device, args, timer):
    fn = _impl(impl)
    n_sets = 1 if impl == "ref" else 3
    iters = 3 if impl == "ref" else args.iters
    warm = 0 if impl == "ref" else args.warmup
    min_runs = 1 if impl == "ref" else 3
    fwd_sets = [_inputs(b, d, n, h, w, dtype, device, False, 1000 + k) for k in range(n_sets)]

    def fwd(x):
        with torch.no_grad():
            return _call(fn, x)

    fwd_ms, fwd_runs = timer.measure(fwd, fwd_sets, iters, warm, args.budget, min_runs)
    fwd_peak = _peak_extra(lambda: fwd(fwd_sets[0]), device, timer)
    del fwd_sets
    bwd_sets = [_inputs(b, d, n, h, w, dtype, device, True, 2000 + k) for k in range(n_sets)]

    def fwd_bwd(x):
        for k, v in x.items():
            if k != "dout":
                v.grad = None
        _call(fn, x).backward(x["dout"])

    both_ms, both_runs = timer.measure(fwd_bwd, bwd_sets, iters, warm, args.budget, min_runs)
    both_peak = _peak_extra(lambda: fwd_bwd(bwd_sets[0]), device, timer)
    kernels = None
    if getattr(args, "kernels", False) and device.type == "cuda" and impl.startswith("cuda"):
        kernels = kernel_breakdown(fwd_bwd, bwd_sets[0])
    del bwd_sets
    return dict(fwd_ms=fwd_ms, fwd_bwd_ms=both_ms, runs=[fwd_runs, both_runs], fwd_peak_mib=fwd_peak,
                fwd_bwd_peak_mib=both_peak, kernels_fwd_bwd_ms=kernels)


def run(args) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    cases = _parse_cases(args.sizes or (GPU_CASES if cuda else CPU_CASES))
    d = args.channels or (256 if cuda else 32)
    n = args.state
    dtypes = (args.dtypes or ("fp32,bf16" if cuda else "fp32")).split(",")
    impls = [s.strip() for s in args.impls.split(",") if s.strip()]
    unknown = [i for i in impls if i not in IMPLS]
    if unknown:  # an unknown name would otherwise time the default kernel under that label
        print(f"gigamamba bench scan: --impls {','.join(unknown)} unknown; choose from {','.join(IMPLS)}", file=sys.stderr)
        return 2
    if any(i.startswith("cuda") for i in impls):
        from gigamamba.ops import scan2d_cuda

        if not cuda or not scan2d_cuda.available():
            print("bench scan: the CUDA kernel is not available here; timing the other paths only")
            impls = [i for i in impls if not i.startswith("cuda")]
    timer = _Timer(device)
    bw = copy_bandwidth(device, timer)
    card = torch.cuda.get_device_name(device) if cuda else "cpu"
    print(f"device: {card}; device-to-device copy {bw:.0f} GB/s (read + write); D={d} N={n}; "
          f"median of up to {args.iters} runs after {args.warmup} warm-up runs")
    rows = []
    for dt_name in dtypes:
        dtype = DTYPES[dt_name.strip()]
        for b, h, w in cases:
            fwd_bytes, both_bytes = _min_bytes(b, d, n, h, w, torch.tensor([], dtype=dtype).element_size())
            results = {}
            for impl in impls:
                if impl == "ref" and h * w > args.oracle_max_cells:
                    continue
                try:
                    results[impl] = bench_case(impl, b, h, w, d, n, dtype, device, args, timer)
                except torch.cuda.OutOfMemoryError:
                    results[impl] = None
                    torch.cuda.empty_cache()
            for impl, res in results.items():
                row = dict(card=card, grid=f"{h}x{w}", batch=b, dtype=dt_name, impl=impl, D=d, N=n,
                           copy_gbps=bw, fwd_min_bytes=fwd_bytes, fwd_bwd_min_bytes=both_bytes,
                           fwd_floor_ms=fwd_bytes / bw / 1e6, fwd_bwd_floor_ms=both_bytes / bw / 1e6)
                if res is None:
                    row["error"] = "out of memory"
                else:
                    row.update(res)
                    row["fwd_gbps"] = fwd_bytes / (res["fwd_ms"] * 1e-3) / 1e9
                    row["fwd_bwd_gbps"] = both_bytes / (res["fwd_bwd_ms"] * 1e-3) / 1e9
                    base = results.get("torch")
                    if base:
                        row["speedup_fwd"] = base["fwd_ms"] / res["fwd_ms"]
                        row["speedup_fwd_bwd"] = base["fwd_bwd_ms"] / res["fwd_bwd_ms"]
                rows.append(row)
                _print_row(row, header=len(rows) == 1)
    if getattr(args, "kernels", False):
        if not cuda:
            print("\n--kernels: the per-kernel breakdown needs CUDA; none here")
        for r in rows:
            if r["impl"].startswith("cuda") and "error" not in r and not r.get("kernels_fwd_bwd_ms"):
                print(f"\n--kernels: the profiler recorded no GPU kernel for {r['grid']} {r['dtype']} {r['impl']} "
                      f"(CUPTI not permitted here?)")
            if r.get("kernels_fwd_bwd_ms"):
                print(f"\nfwd+bwd per kernel, {r['grid']} B={r['batch']} {r['dtype']} {r['impl']} "
                      f"(ms per call; the table's fwd+bwd: {r['fwd_bwd_ms']:.3f})")
                for label, ms in r["kernels_fwd_bwd_ms"].items():
                    print(f"  {ms:8.3f}  {label}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


def _fmt(v, spec):
    return "—" if v is None else format(v, spec)


def _print_row(r, header):
    if header:
        print("\n| grid | B | dtype | impl | fwd ms | fwd floor ms | fwd GB/s | fwd+bwd ms | fwd+bwd floor ms "
              "| fwd+bwd GB/s | × torch fwd | × torch fwd+bwd | peak extra MiB fwd / fwd+bwd |")
        print("|" + "---|" * 13)
    if "error" in r:
        print(f"| {r['grid']} | {r['batch']} | {r['dtype']} | {r['impl']} | {r['error']} |" + " |" * 9)
        return
    print(f"| {r['grid']} | {r['batch']} | {r['dtype']} | {r['impl']} | {r['fwd_ms']:.3f} | {r['fwd_floor_ms']:.3f} "
          f"| {r['fwd_gbps']:.4g} | {r['fwd_bwd_ms']:.3f} | {r['fwd_bwd_floor_ms']:.3f} | {r['fwd_bwd_gbps']:.4g} "
          f"| {_fmt(r.get('speedup_fwd'), '.1f')} | {_fmt(r.get('speedup_fwd_bwd'), '.1f')} "
          f"| {_fmt(r.get('fwd_peak_mib'), '.0f')} / {_fmt(r.get('fwd_bwd_peak_mib'), '.0f')} |", flush=True)
