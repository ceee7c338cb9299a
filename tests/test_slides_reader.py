"""Real OpenSlide on synthetic SVS and TIFF: MPP resolution, tissue detection, tile reads, bad files."""

import shutil

import numpy as np
import pytest

from gigamamba.slides.reader import SlideError, open_slide, read_tiles, resolve_mpp
from gigamamba.slides.synth import render_slide, truncate_file, write_pyramid_tiff
from gigamamba.slides.tissue import detect_tissue


@pytest.fixture(scope="module")
def tissue_rgb():
    rng = np.random.default_rng(0)
    blobs = [{"kind": "A", "cy": 300.0, "cx": 250.0, "ry": 180.0, "rx": 150.0},
             {"kind": "B", "cy": 320.0, "cx": 640.0, "ry": 150.0, "rx": 150.0}]
    return render_slide(blobs, (1280, 1792), rng)  # blobs in um; 640 x 896 um at 0.5 um/px


@pytest.fixture(scope="module")
def slides(tmp_path_factory, tissue_rgb):
    d = tmp_path_factory.mktemp("slides")
    return {
        "svs": write_pyramid_tiff(d / "a.svs", tissue_rgb, 0.5, aperio=True),
        "tif": write_pyramid_tiff(d / "b.tif", tissue_rgb, 0.5, aperio=False),
        "nompp": write_pyramid_tiff(d / "c.tif", tissue_rgb, None, aperio=False),
        "blank": write_pyramid_tiff(d / "d.svs", np.full((1024, 1024, 3), 242, np.uint8), 0.5, aperio=True),
    }


def test_mpp_order_and_sources():
    assert resolve_mpp({"openslide.mpp-x": "0.2520", "openslide.mpp-y": "0.2530", "aperio.MPP": "0.5"}) == (0.252, 0.253)
    assert resolve_mpp({"aperio.MPP": "0.499"}) == (0.499, 0.499)
    assert resolve_mpp({"philips.DICOM_PIXEL_SPACING": '"0.000226" "0.000227"'}) == pytest.approx((0.227, 0.226))
    assert resolve_mpp({"tiff.XResolution": "40000", "tiff.YResolution": "40000",
                        "tiff.ResolutionUnit": "centimeter"}) == (0.25, 0.25)
    assert resolve_mpp({"tiff.XResolution": "50800", "tiff.YResolution": "50800",
                        "tiff.ResolutionUnit": "inch"}) == pytest.approx((0.5, 0.5))
    # a cohort override wins over everything in the file
    assert resolve_mpp({"openslide.mpp-x": "0.25", "openslide.mpp-y": "0.25"}, override=0.5) == (0.5, 0.5)
    # implausible values and unit-less resolution tags are not an MPP
    with pytest.raises(SlideError):
        resolve_mpp({"openslide.mpp-x": "0", "tiff.XResolution": "1", "tiff.YResolution": "1",
                     "tiff.ResolutionUnit": "none"}, slide_id="S9")


def test_missing_mpp_message_names_slide_and_fix():
    with pytest.raises(SlideError) as exc:
        resolve_mpp({}, slide_id="TCGA-AA-0001-01Z")
    msg = str(exc.value)
    assert "TCGA-AA-0001-01Z" in msg and "`mpp` column" in msg and "\n" not in msg


def test_openslide_reads_synthetic_svs_and_tiff(slides):
    svs, tif = open_slide(slides["svs"]), open_slide(slides["tif"])
    assert svs.properties["openslide.vendor"] == "aperio"
    assert tif.properties["openslide.vendor"] == "generic-tiff"
    for s in (svs, tif):
        assert s.dimensions == (1792, 1280)
        assert s.level_count == 3 and s.level_downsamples[1] == pytest.approx(4.0)
        assert resolve_mpp(s.properties) == (0.5, 0.5)
    nompp = open_slide(slides["nompp"])
    with pytest.raises(SlideError, match="mpp"):
        resolve_mpp(nompp.properties, slide_id="c")
    assert resolve_mpp(nompp.properties, override=0.5, slide_id="c") == (0.5, 0.5)


def test_tissue_detection_finds_the_blobs_and_nothing_on_glass(slides):
    slide = open_slide(slides["svs"])
    mask = detect_tissue(slide, (0.5, 0.5))
    h, w = mask.shape
    sy, sx = 1280 / h, 1792 / w
    assert mask[int(600 / sy), int(500 / sx)] and mask[int(640 / sy), int(1280 / sx)]  # blob centres (px)
    assert not mask[int(1200 / sy), int(1700 / sx)] and not mask[0, 0]                # glass
    frac = mask.mean()
    expected = (np.pi * (180 * 150 + 150 * 150)) / (640 * 896)
    assert abs(frac - expected) < 0.35 * expected
    assert not detect_tissue(open_slide(slides["blank"]), (0.5, 0.5)).any()


def test_read_tiles_positions_and_resize(slides, tissue_rgb):
    tiles = read_tiles(str(slides["tif"]), 0, np.array([128, 1600]), np.array([256, 1100]), 128, 64)
    assert tiles.shape == (2, 64, 64, 3) and tiles.dtype == np.uint8
    want = tissue_rgb[256:384, 128:256].reshape(64, 2, 64, 2, 3).mean((1, 3))
    assert np.abs(tiles[0].astype(float) - want).mean() < 12  # JPEG + resampling, same picture
    # beyond the slide's edge is glass (white), not black
    edge = read_tiles(str(slides["tif"]), 0, np.array([1750]), np.array([10]), 128, 128)
    assert edge[0, :, 100:].min() >= 250


def test_missing_and_truncated_files(tmp_path, slides):
    with pytest.raises(SlideError, match="does not exist"):
        open_slide(tmp_path / "nope.svs", "S1")
    bad = tmp_path / "trunc.svs"
    shutil.copy(slides["svs"], bad)
    truncate_file(bad, 0.5)
    with pytest.raises(SlideError, match="trunc"):
        open_slide(bad, "trunc")


def test_corrupt_tile_raises_a_slide_error(tmp_path, slides):
    from gigamamba.slides.synth import corrupt_tile

    bad = tmp_path / "bad.svs"
    shutil.copy(slides["svs"], bad)
    x, y = corrupt_tile(bad, 500, 600)
    with pytest.raises(SlideError, match="corrupt tile"):
        read_tiles(str(bad), 0, np.array([x]), np.array([y]), 64, 64)
