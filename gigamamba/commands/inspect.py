"""`gigamamba inspect STORE`: slides, grid sizes, tissue cells, failures and feature statistics of a store."""

from __future__ import annotations

import sys


def configure(parser) -> None:
    parser.add_argument("store", help="feature-grid store (features.zarr)")
    parser.add_argument("--no-stats", action="store_true", help="skip the per-channel mean/std pass (dask)")


def run(args) -> int:
    import numpy as np
    import pandas as pd

    from gigamamba.features.store import GridStore, StoreError, channel_stats

    try:
        store = GridStore(args.store)
    except StoreError as exc:
        print(f"gigamamba inspect: {exc}", file=sys.stderr)
        return 2
    attrs = store.attrs
    enc, tiling = attrs.get("encoder", {}), attrs.get("tiling", {})
    print(f"store    {store.path}  ({attrs.get('schema')}, gigamamba {attrs.get('version')})")
    print(f"encoder  {enc.get('name')}  dim {enc.get('dim')}  weights {enc.get('weights')}  input {enc.get('input_px')} px"
          + (f"  sha256 {enc['weights_sha256'][:12]}" if enc.get("weights_sha256") else ""))
    print(f"tiling   {tiling.get('patch_px')} px at {tiling.get('target_mpp')} um/px, tissue >= {tiling.get('tissue_threshold')}")
    complete = store.complete_slides()
    rows = []
    for sid in complete:
        a = store.slide_attrs(sid)
        h, w = a["grid_shape"]
        rows.append({"slide_id": sid, "H": h, "W": w, "tiles": a["n_tiles"], "fill": a["n_tiles"] / max(h * w, 1),
                     "mpp": a["mpp"][0]})
    df = pd.DataFrame(rows)
    manifest = store.manifest()
    failed = manifest[manifest["status"] != "complete"]
    print(f"slides   {len(complete)} complete, {len(failed)} failed or incomplete")
    if len(df):
        print(f"grids    H {df.H.min()}-{df.H.max()} (median {df.H.median():g}), W {df.W.min()}-{df.W.max()} "
              f"(median {df.W.median():g}); tissue cells {df.tiles.sum()} total, {df.tiles.min()}-{df.tiles.max()} "
              f"a slide; {df.fill.mean():.0%} of grid cells are tissue")
        if not args.no_stats:
            mean, std = channel_stats(store.path)
            print(f"features mean over channels {np.mean(mean):.4f} (range {mean.min():.3f}..{mean.max():.3f}), "
                  f"std {np.mean(std):.4f} (range {std.min():.3f}..{std.max():.3f}); "
                  f"{int((std < 1e-6).sum())} constant channel(s)")
    if len(failed):
        print("\nfailures:")
        print(failed[["slide_id", "status", "error"]].to_string(index=False, max_colwidth=140))
    return 0
