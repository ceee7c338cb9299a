"""Reading slides with OpenSlide (the library comes from the openslide-bin wheel) and resolving their MPP.

    slide = open_slide(path, slide_id)             # SlideError with a one-line reason on failure
    mpp_x, mpp_y = resolve_mpp(slide.properties, override=row.mpp, slide_id=...)
    tiles = read_tiles(path, level, xs, ys, read_px, out_px)   # (n, out_px, out_px, 3) uint8

MPP resolution order: a cohort `mpp` override, then OpenSlide's `openslide.mpp-x/y`, then vendor keys
(aperio.MPP, Philips/DICOM pixel spacing, MIRAX, Ventana, Leica), then the TIFF resolution tags.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Mapping

import numpy as np

MPP_RANGE = (0.02, 50.0)  # um/px; anything outside is a mislabelled header, not a microscope


class SlideError(RuntimeError):
    """A slide that cannot be used; the message is one line naming the slide and, when there is one, the fix."""


def open_slide(path: str | Path, slide_id: str | None = None):
    """Open a slide with OpenSlide; raise SlideError (missing, unreadable or unsupported file)."""
    import openslide

    name = slide_id or Path(path).name
    path = Path(path)
    if not path.is_file():
        raise SlideError(f"slide {name}: file {path} does not exist")
    try:
        return openslide.OpenSlide(str(path))
    except openslide.OpenSlideUnsupportedFormatError:
        raise SlideError(f"slide {name}: {path} is not a slide format OpenSlide can read (corrupt or truncated?)") from None
    except openslide.OpenSlideError as exc:
        raise SlideError(f"slide {name}: {path} is corrupt or truncated ({_one_line(exc)})") from None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _valid(mpp: float | None) -> float | None:
    if mpp is None or not math.isfinite(mpp) or not MPP_RANGE[0] <= mpp <= MPP_RANGE[1]:
        return None
    return float(mpp)


def _number(text) -> float | None:
    try:
        return float(str(text).strip().split()[0])
    except (ValueError, IndexError):
        return None


def _from_openslide(props: Mapping[str, str]):
    return _number(props.get("openslide.mpp-x")), _number(props.get("openslide.mpp-y"))


def _from_vendor(props: Mapping[str, str]):
    if "aperio.MPP" in props:
        v = _number(props["aperio.MPP"])
        return v, v
    for key in ("philips.DICOM_PIXEL_SPACING", "dicom.PixelSpacing"):
        if key in props:  # millimetres, "row col" (y then x)
            parts = str(props[key]).replace('"', " ").replace("\\", " ").split()
            vals = [_number(p) for p in parts if _number(p) is not None]
            if vals:
                y = vals[0] * 1000
                x = (vals[1] if len(vals) > 1 else vals[0]) * 1000
                return x, y
    mx = props.get("mirax.LAYER_0_LEVEL_0_SECTION.MICROMETER_PER_PIXEL_X")
    my = props.get("mirax.LAYER_0_LEVEL_0_SECTION.MICROMETER_PER_PIXEL_Y")
    if mx and my:
        return _number(mx), _number(my)
    if "ventana.ScanRes" in props:
        v = _number(props["ventana.ScanRes"])
        return v, v
    return None, None


_UNIT_UM = {"centimeter": 1e4, "centimetre": 1e4, "3": 1e4, "inch": 25400.0, "2": 25400.0}


def _from_tiff(props: Mapping[str, str]):
    unit = str(props.get("tiff.ResolutionUnit", "")).strip().lower()
    um = _UNIT_UM.get(unit)
    rx, ry = _number(props.get("tiff.XResolution")), _number(props.get("tiff.YResolution"))
    if um is None or not rx or not ry:
        return None, None
    return um / rx, um / ry


def resolve_mpp(props: Mapping[str, str], override: float | None = None,
                slide_id: str = "?") -> tuple[float, float]:
    """(mpp_x, mpp_y) in micrometres per level-0 pixel.

    `override` (the cohort's `mpp` column) wins; then openslide.mpp-x/y; then vendor keys; then the TIFF
    resolution tags. Raises SlideError naming the slide and the fix when none gives a plausible value.
    """
    if override is not None and not (isinstance(override, float) and math.isnan(override)):
        v = _valid(_number(override))
        if v is None:
            raise SlideError(f"slide {slide_id}: cohort mpp {override!r} is not a plausible microns-per-pixel value")
        return v, v
    for source in (_from_openslide, _from_vendor, _from_tiff):
        x, y = source(props)
        x, y = _valid(x), _valid(y)
        if x and y:
            return x, y
        if x or y:
            return (x or y), (x or y)
    raise SlideError(f"slide {slide_id}: no microns-per-pixel (MPP) in the file; add an `mpp` column to the "
                     "cohort CSV with this slide's level-0 um/px (e.g. 0.25 for 40x, 0.5 for 20x)")


# ----------------------------------------------------------------------------- tiles

class SlideCache:
    """Open OpenSlide handles kept per worker process, least recently used closed first.

    Opening a slide parses its whole TIFF directory, so a worker that reads many tile batches of one
    slide reuses one handle. After a read error OpenSlide marks a handle unusable, so it is dropped.
    """

    def __init__(self, capacity: int = 8):
        self.capacity = capacity
        self._handles: OrderedDict[str, object] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, path: str):
        with self._lock:
            if path in self._handles:
                self._handles.move_to_end(path)
                return self._handles[path]
        handle = open_slide(path)
        with self._lock:
            self._handles[path] = handle
            while len(self._handles) > self.capacity:
                _, old = self._handles.popitem(last=False)
                old.close()
        return handle

    def drop(self, path: str) -> None:
        with self._lock:
            handle = self._handles.pop(path, None)
        if handle is not None:
            try:
                handle.close()
            except Exception:
                pass


_CACHE = SlideCache()


def read_tiles(path: str, level: int, xs: np.ndarray, ys: np.ndarray, read_px: int, out_px: int,
               cache: SlideCache | None = None) -> np.ndarray:
    """Read square tiles at level-0 positions (xs, ys), `read_px` wide at `level`, resized to `out_px`.

    Transparent pixels (outside the scanned area) become white, as glass would. Returns
    (n, out_px, out_px, 3) uint8. Raises SlideError (naming the tile position) on a corrupt tile.
    """
    import openslide
    from PIL import Image

    cache = cache or _CACHE
    slide = cache.get(path)
    out = np.empty((len(xs), out_px, out_px, 3), np.uint8)
    for k, (x, y) in enumerate(zip(xs, ys)):
        try:
            region = slide.read_region((int(x), int(y)), int(level), (read_px, read_px))
        except openslide.OpenSlideError as exc:
            cache.drop(path)
            raise SlideError(f"corrupt tile at level-0 ({int(x)}, {int(y)}): {_one_line(exc)}") from None
        rgba = np.asarray(region)
        if rgba[..., 3].min() < 255:
            white = Image.new("RGBA", region.size, (255, 255, 255, 255))
            region = Image.alpha_composite(white, region)
        rgb = region.convert("RGB")
        if read_px != out_px:
            rgb = rgb.resize((out_px, out_px), Image.BILINEAR)
        out[k] = np.asarray(rgb)
    return out
