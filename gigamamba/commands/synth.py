"""`gigamamba synth OUT --task classification|survival|spatial --slides N`: synthetic slides and a cohort.csv."""

from __future__ import annotations

import sys


def configure(parser) -> None:
    parser.add_argument("out", help="output folder (slides/ and cohort.csv are written there)")
    parser.add_argument("--task", choices=("classification", "survival", "spatial"), default="classification")
    parser.add_argument("--slides", type=int, default=8, help="number of slides (default 8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size-px", type=int, default=3072,
                        help="canvas side in 20x pixels (0.5 um/px); 3072 = 12 tiles of 256 px (default)")
    parser.add_argument("--magnification", type=int, choices=(20, 40), action="append", default=None,
                        help="pin the scan magnification (repeat for a rotation); default alternates 20x and 40x")
    parser.add_argument("--format", choices=("svs", "tif"), action="append", default=None,
                        help="pin the file format (repeat for a rotation); default alternates SVS and TIFF")


def run(args) -> int:
    import time

    from gigamamba.slides.synth import write_synthetic_cohort

    t0 = time.perf_counter()
    try:
        csv = write_synthetic_cohort(args.out, task=args.task, n_slides=args.slides, seed=args.seed,
                                     size_px=args.size_px, formats=tuple(args.format or ()) or None,
                                     magnifications=tuple(args.magnification or ()) or None)
    except ValueError as exc:
        print(f"gigamamba synth: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.slides} {args.task} slides and {csv} in {time.perf_counter() - t0:.1f} s")
    return 0
