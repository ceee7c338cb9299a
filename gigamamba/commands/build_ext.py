"""`gigamamba build-ext`: compile the CUDA scan2d extension ahead of time (for cluster images).

The build lands in TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions); a process that later
imports gigamamba with the same directory and sources loads it without compiling.
"""

from __future__ import annotations

import os
import sys
import time


def configure(parser) -> None:
    parser.add_argument("--arch", default=None,
                        help='TORCH_CUDA_ARCH_LIST, e.g. "8.0;9.0" (default: the GPU present, else 9.0)')
    parser.add_argument("--build-dir", default=None, help="TORCH_EXTENSIONS_DIR to build into")
    parser.add_argument("--jobs", type=int, default=None, help="parallel compile jobs (MAX_JOBS)")
    parser.add_argument("--quiet", action="store_true", help="hide the compiler's output")


def run(args) -> int:
    if args.arch:
        os.environ["TORCH_CUDA_ARCH_LIST"] = args.arch
    if args.build_dir:
        os.environ["TORCH_EXTENSIONS_DIR"] = os.path.abspath(args.build_dir)
    if args.jobs:
        os.environ["MAX_JOBS"] = str(args.jobs)
    from gigamamba.ops import scan2d_cuda

    if scan2d_cuda.cuda_home() is None:
        print("build-ext: nvcc (the CUDA compiler) was not found; set CUDA_HOME", file=sys.stderr)
        return 1
    print(f"build-ext: {scan2d_cuda.compiler_report()}")
    t0 = time.perf_counter()
    try:
        module = scan2d_cuda.build(verbose=not args.quiet)
    except Exception as exc:  # the compiler's own output is above; one line for the summary
        print(f"build-ext: the scan2d extension failed to build: {str(exc).strip().splitlines()[0]}", file=sys.stderr)
        return 1
    print(f"build-ext: built {module.__file__} in {time.perf_counter() - t0:.0f} s "
          f"(arch {os.environ.get('TORCH_CUDA_ARCH_LIST', 'of the GPU present')})")
    return 0
