"""Synthetic whole-slide images: real pyramidal JPEG-tiled TIFF/SVS files that OpenSlide opens.

The demo and the tests get real files this way, so every layer below them (OpenSlide, tissue
detection, the lattice, the encoder, the store) runs exactly as it would on a hospital slide.

Public API:
    write_synthetic_cohort(out_dir, task, n_slides, seed, size_px, ...) -> Path of cohort.csv
    render_slide(layout, size_px, rng) -> (H, W, 3) uint8 at 20x (0.5 um/px)
    write_pyramid_tiff(path, rgb, mpp, aperio=..., ...) -> Path

Tissue types ("textures") differ in stroma colour and in nucleus density and size, enough that
even a random-weight CNN separates them (the demo encodes with random weights):
    A: pink stroma, sparse small nuclei (normal-like)
    B: purple stroma, dense large nuclei (tumour-like)

Tasks:
    classification  label 1 slides carry a share of type-B tissue; label 0 slides are all type A.
    survival        the type-B share sets the hazard; times are exponential, censoring uniform.
    spatial         four equal blobs on a 2x2 layout, always two A and two B. Label 0: the two A
                    blobs share a row (A above B, or B above A); label 1: they share a column (side by
                    side). Same amounts, same shapes, same bounding box, gaps wider than a tile between
                    blobs (no tile mixes A and B), so the bag of tiles is identically distributed in both
                    classes: only a model that sees the 2D arrangement can solve it.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

# Every slide is drawn once at RENDER_MPP and upsampled to 20x (0.5 um/px) or 40x (0.25 um/px), so a 20x
# and a 40x slide of one layout hold the same tissue, and drawing stays cheap on a laptop.
BASE_MPP = 0.5
RENDER_MPP = 1.0
CELL_UM = 128.0  # one default tile: 256 px at 0.5 um/px; layouts are specified in these cells
BACKGROUND = (242, 241, 243)

TEXTURES = {
    # stroma RGB, nucleus RGB, nuclei per 100x100 um, nucleus sigma (um)
    "A": {"stroma": (236, 168, 196), "nucleus": (120, 60, 150), "density": 6.0, "sigma_um": 1.6},
    "B": {"stroma": (178, 112, 190), "nucleus": (60, 20, 100), "density": 30.0, "sigma_um": 2.6},
}
TASKS = ("classification", "survival", "spatial")


# ----------------------------------------------------------------------------- drawing

def _smooth_noise(shape: tuple[int, int], scale_px: float, rng: np.random.Generator) -> np.ndarray:
    """Low-frequency noise in [-1, 1] of `shape`, varying over about `scale_px` pixels."""
    from scipy.ndimage import zoom

    small = (max(2, math.ceil(shape[0] / scale_px) + 1), max(2, math.ceil(shape[1] / scale_px) + 1))
    coarse = rng.uniform(-1, 1, small).astype(np.float32)
    up = zoom(coarse, (shape[0] / small[0] * 1.0001, shape[1] / small[1] * 1.0001), order=1)
    return up[: shape[0], : shape[1]]


def _texture(kind: str, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """(H, W, 3) float32 RGB texture of tissue type `kind` at RENDER_MPP."""
    from scipy.ndimage import gaussian_filter

    t = TEXTURES[kind]
    h, w = shape
    sigma = t["sigma_um"] / RENDER_MPP
    n_nuclei = rng.poisson(t["density"] * (h * w * RENDER_MPP**2) / 1e4)
    impulses = np.zeros(shape, np.float32)
    ys = rng.integers(0, h, n_nuclei)
    xs = rng.integers(0, w, n_nuclei)
    np.add.at(impulses, (ys, xs), rng.uniform(0.7, 1.3, n_nuclei).astype(np.float32))
    nuclei = gaussian_filter(impulses, sigma, mode="constant", truncate=2.5) * (2 * math.pi * sigma**2)
    nuclei = np.clip(nuclei * 1.6, 0, 1)
    stroma = np.asarray(t["stroma"], np.float32) * (1 + 0.06 * _smooth_noise(shape, 30, rng))[..., None]
    stroma += 6 * rng.standard_normal((h, w, 1), dtype=np.float32)
    out = stroma * (1 - nuclei[..., None]) + np.asarray(t["nucleus"], np.float32) * nuclei[..., None]
    return out


def _blob_mask(shape: tuple[int, int], cy: float, cx: float, ry: float, rx: float,
               rng: np.random.Generator, wobble: float = 0.12) -> np.ndarray:
    """Bool mask of an ellipse-like blob with a wavy outline, centred at (cy, cx) in pixels."""
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    dy, dx = (yy - cy) / ry, (xx - cx) / rx
    angle = np.arctan2(dy, dx)
    radius = np.ones_like(angle)
    for k in (2, 3, 5):
        radius = radius + wobble / k * math.sqrt(k) * np.cos(k * angle + rng.uniform(0, 2 * math.pi))
    return dy**2 + dx**2 <= radius**2


def render_slide(layout: list[dict], size_px: tuple[int, int], rng: np.random.Generator,
                 mpp: float = BASE_MPP) -> np.ndarray:
    """Draw tissue blobs on a white background.

    layout: blobs, each {"kind": "A"|"B", "cy", "cx", "ry", "rx"} in micrometres (optional "wobble");
    later blobs paint over earlier ones. size_px: (H, W) of the output at `mpp` um/px.
    Drawn at RENDER_MPP and resized, so the same layout and rng give the same tissue at any mpp.
    Returns (H, W, 3) uint8.
    """
    from PIL import Image

    h_um, w_um = size_px[0] * mpp, size_px[1] * mpp
    hr, wr = math.ceil(h_um / RENDER_MPP), math.ceil(w_um / RENDER_MPP)
    # Outlines are drawn at quarter resolution: they need not be finer than a few micrometres.
    q = 4
    hs, ws = math.ceil(hr / q), math.ceil(wr / q)
    labels = np.zeros((hs, ws), np.uint8)
    kinds = sorted(TEXTURES)
    px = RENDER_MPP * q
    for blob in layout:
        m = _blob_mask((hs, ws), blob["cy"] / px, blob["cx"] / px, blob["ry"] / px, blob["rx"] / px, rng,
                       blob.get("wobble", 0.12))
        labels[m] = kinds.index(blob["kind"]) + 1
    labels = labels.repeat(q, 0).repeat(q, 1)[:hr, :wr]
    img = np.empty((hr, wr, 3), np.float32)
    img[:] = BACKGROUND
    img += 2.0 * rng.standard_normal((hr, wr, 1), dtype=np.float32)
    for idx, kind in enumerate(kinds, start=1):
        where = labels == idx
        if not where.any():
            continue
        rows = np.flatnonzero(where.any(1))
        cols = np.flatnonzero(where.any(0))
        box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
        tex = _texture(kind, (rows[-1] + 1 - rows[0], cols[-1] + 1 - cols[0]), rng)
        sub = where[box]
        img[box][sub] = tex[sub]
    rgb = np.clip(img, 0, 255).astype(np.uint8)
    if (hr, wr) != tuple(size_px):
        rgb = np.asarray(Image.fromarray(rgb).resize((size_px[1], size_px[0]), Image.BILINEAR))
    return rgb


# ----------------------------------------------------------------------------- files

def _pyramid(rgb: np.ndarray, factor: int = 4, smallest: int = 256) -> list[np.ndarray]:
    """Levels at downsample 1, 4, 16, ... (box filter, sizes floored as scanners do)."""
    from PIL import Image

    levels = [rgb]
    while max(levels[-1].shape[:2]) > smallest and min(levels[-1].shape[:2]) >= factor:
        a = levels[-1]
        h, w = a.shape[0] // factor * factor, a.shape[1] // factor * factor
        levels.append(np.asarray(Image.fromarray(np.ascontiguousarray(a[:h, :w])).reduce(factor)))
    return levels


def write_pyramid_tiff(path: str | Path, rgb: np.ndarray, mpp: float | None, aperio: bool = False,
                       tile_px: int = 256, quality: int = 85, magnification: int | None = None) -> Path:
    """Write `rgb` (H, W, 3) uint8 as a pyramidal, JPEG-tiled TIFF that OpenSlide opens.

    Each pyramid level (downsample 4, 16, ...) is its own top-level page: OpenSlide sees only one level
    when levels are written as SubIFDs. aperio=True writes the "Aperio ..." ImageDescription header
    (with `MPP = mpp`) that OpenSlide's aperio driver keys on (save it as .svs); otherwise a generic
    tiled TIFF whose MPP lives in the resolution tags (pixels per centimetre). mpp=None writes no MPP
    at all (to test slides that need a cohort `mpp` override).
    """
    import tifffile

    path = Path(path)
    h, w = rgb.shape[:2]
    mag = magnification or (round(10 / mpp) if mpp else 20)
    with tifffile.TiffWriter(path, bigtiff=rgb.nbytes > 2**31) as tw:
        for k, level in enumerate(_pyramid(rgb)):
            kw: dict = {"metadata": None}
            lh, lw = level.shape[:2]
            if aperio:
                head = f"Aperio Image Library v12.0.15 \r\n{w}x{h} [0,0 {w}x{h}] ({tile_px}x{tile_px}) JPEG/RGB Q={quality}"
                if k:
                    head = f"Aperio Image Library v12.0.15 \r\n{w}x{h} -> {lw}x{lh} - "
                fields = [f"AppMag = {mag}"] + ([f"MPP = {mpp:.6f}"] if mpp else [])
                kw["description"] = head + "|" + "|".join(fields)
            elif mpp:
                kw["resolution"] = (1e4 / mpp, 1e4 / mpp)
                kw["resolutionunit"] = "CENTIMETER"
            tw.write(level, tile=(tile_px, tile_px), compression="jpeg", compressionargs={"level": quality},
                     photometric="rgb", subfiletype=0 if k == 0 else 1, **kw)
    return path


# ----------------------------------------------------------------------------- layouts

def _cells_to_um(c: float) -> float:
    return c * CELL_UM


def _random_blobs(n_cells: float, n_blobs: int, rng: np.random.Generator) -> list[dict]:
    """n_blobs ellipses inside a square canvas of n_cells tiles, all type A."""
    blobs = []
    for _ in range(n_blobs):
        ry = rng.uniform(0.14, 0.24) * n_cells
        rx = rng.uniform(0.14, 0.24) * n_cells
        cy = rng.uniform(ry + 0.5, n_cells - ry - 0.5)
        cx = rng.uniform(rx + 0.5, n_cells - rx - 0.5)
        blobs.append({"kind": "A", "cy": cy, "cx": cx, "ry": ry, "rx": rx})
    return blobs


def _layout_mixture(n_cells: float, share_b: float, rng: np.random.Generator) -> list[dict]:
    """Type-A blobs, with type-B patches painted over roughly `share_b` of the tissue area."""
    blobs = _random_blobs(n_cells, int(rng.integers(3, 5)), rng)
    if share_b > 0:
        area = sum(math.pi * b["ry"] * b["rx"] for b in blobs)
        target = share_b * area
        painted = 0.0
        while painted < target:
            host = blobs[int(rng.integers(len(blobs)))]
            r = min(host["ry"], host["rx"]) * rng.uniform(0.45, 0.8)
            r = min(r, math.sqrt(max(target - painted, 0.3) / math.pi) + 0.3)
            ang, dist = rng.uniform(0, 2 * math.pi), rng.uniform(0, 0.4) * min(host["ry"], host["rx"])
            blobs.append({"kind": "B", "cy": host["cy"] + dist * math.sin(ang),
                          "cx": host["cx"] + dist * math.cos(ang), "ry": r, "rx": r, "wobble": 0.05})
            painted += math.pi * r * r
    return blobs


def _layout_spatial(n_cells: float, label: int, rng: np.random.Generator) -> list[dict]:
    """2x2 blobs: label 0 puts both A blobs in one row, label 1 in one column (see module doc)."""
    gap = 1.5  # cells between blobs: wider than a tile, so no tile holds both A and B
    margin = 0.75
    d = (n_cells - 2 * margin - gap) / 2
    r = d / 2
    centres = [margin + r, margin + d + gap + r]
    a_first = bool(rng.integers(2))  # which row (label 0) or column (label 1) holds A
    blobs = []
    for row in range(2):
        for col in range(2):
            line = row if label == 0 else col
            kind = "A" if (line == 0) == a_first else "B"
            jitter = rng.uniform(-0.15, 0.15, 2) * gap
            blobs.append({"kind": kind, "cy": centres[row] + jitter[0], "cx": centres[col] + jitter[1],
                          "ry": r * rng.uniform(0.85, 1.0), "rx": r * rng.uniform(0.85, 1.0), "wobble": 0.08})
    return blobs


def _scale(blobs: list[dict]) -> list[dict]:
    out = []
    for b in blobs:
        out.append({**b, **{k: _cells_to_um(b[k]) for k in ("cy", "cx", "ry", "rx")}})
    return out


# ----------------------------------------------------------------------------- cohort

def slide_variant(index: int) -> tuple[str, int]:
    """(format, magnification) of the index-th synthetic slide: svs/tif x 20/40 in rotation."""
    fmt = "svs" if index % 2 == 0 else "tif"
    mag = 20 if (index // 2) % 2 == 0 else 40
    return fmt, mag


def write_synthetic_cohort(out_dir: str | Path, task: str = "classification", n_slides: int = 8, seed: int = 0,
                           size_px: int = 3072, slides_per_case: int = 1, formats: tuple[str, ...] | None = None,
                           magnifications: tuple[int, ...] | None = None, quality: int = 85) -> Path:
    """Write `n_slides` synthetic slides and a cohort.csv into `out_dir`; return the CSV's path.

    task: "classification" | "survival" | "spatial" (module doc says what each label means).
    size_px: side of the square canvas in 20x pixels (0.5 um/px); the default 3072 is 12 tiles of
    256 px at 0.5 um/px, about 60-110 tissue tiles a slide at the default tiling.
    Slides rotate through Aperio SVS / generic tiled TIFF and 20x (0.5 um/px) / 40x (0.25 um/px),
    unless `formats` / `magnifications` pin them. Labels are balanced (classification, spatial).
    slides_per_case > 1 gives patients with several slides (slide ids <case>-<k>).
    CSV columns: slide_id, case_id, label (classification, spatial) or survival_months and
    censorship (survival; 1 = censored), slide_path (relative to the CSV's folder).
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if n_slides < 1:
        raise ValueError("n_slides must be at least 1")
    out = Path(out_dir)
    (out / "slides").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n_cells = size_px * BASE_MPP / CELL_UM
    labels = rng.permutation(np.arange(n_slides) % 2)
    rows = []
    for k in range(n_slides):
        fmt, mag = slide_variant(k)
        if formats:
            fmt = formats[k % len(formats)]
        if magnifications:
            mag = magnifications[k % len(magnifications)]
        case = f"case{k // slides_per_case:03d}"
        slide_id = f"{task[:4]}{k:03d}" if slides_per_case == 1 else f"{case}-{k % slides_per_case}"
        row: dict = {"slide_id": slide_id, "case_id": case}
        srng = np.random.default_rng([seed, k])
        if task == "classification":
            label = int(labels[k])
            blobs = _layout_mixture(n_cells, srng.uniform(0.25, 0.45) if label else 0.0, srng)
            row["label"] = label
        elif task == "spatial":
            label = int(labels[k])
            blobs = _layout_spatial(n_cells, label, srng)
            row["label"] = label
        else:
            share = float(srng.uniform(0.0, 0.6))
            blobs = _layout_mixture(n_cells, share, srng)
            hazard = 0.02 * math.exp(4.0 * share)  # per month
            t_event = srng.exponential(1 / hazard)
            t_censor = srng.uniform(12, 150)
            row["survival_months"] = round(float(min(t_event, t_censor)), 2)
            row["censorship"] = int(t_censor < t_event)
        mpp = BASE_MPP * 20 / mag
        side = round(size_px * BASE_MPP / mpp)
        rgb = render_slide(_scale(blobs), (side, side), srng, mpp=mpp)
        name = f"{slide_id}.{fmt}"
        write_pyramid_tiff(out / "slides" / name, rgb, mpp, aperio=(fmt == "svs"), quality=quality,
                           magnification=mag)
        row["slide_path"] = f"slides/{name}"
        rows.append(row)
    csv_path = out / "cohort.csv"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return csv_path


# ----------------------------------------------------------------------------- broken slides (for tests)

def corrupt_tile(path: str | Path, x: int, y: int) -> tuple[int, int]:
    """Overwrite the level-0 JPEG tile holding level-0 pixel (x, y) with zeros, in place.

    Reading that tile then fails inside OpenSlide ("Not a JPEG file"), as a damaged scan would, while
    the slide still opens and its lower levels (the thumbnail) stay readable. Returns the tile's
    level-0 top-left corner.
    """
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        tw, th = page.tilewidth, page.tilelength
        across = -(-page.imagewidth // tw)
        k = (y // th) * across + (x // tw)
        offset, count = page.dataoffsets[k], page.databytecounts[k]
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"\x00" * min(count, 256))
    return (x // tw) * tw, (y // th) * th


def truncate_file(path: str | Path, fraction: float = 0.5) -> None:
    """Cut a file to `fraction` of its bytes, like an interrupted copy."""
    path = Path(path)
    with open(path, "r+b") as f:
        f.truncate(int(path.stat().st_size * fraction))
