"""The gigamamba.grid/1 store: round trip, "complete" written last, manifest, dask stats, unsafe ids."""

import numpy as np
import pytest

from gigamamba.features.store import SCHEMA, GridStore, StoreError, channel_stats, check_slide_id

ENC = {"name": "tiny", "dim": 8, "weights": "random", "input_px": 32, "mean": [0.5] * 3, "std": [0.2] * 3}
TILING = {"patch_px": 128, "target_mpp": 0.5, "tissue_threshold": 0.25}


def _slide(rng, h=5, w=7, d=8):
    return rng.normal(size=(h, w, d)).astype(np.float32), rng.random((h, w)) > 0.3


@pytest.fixture
def store(tmp_path):
    s = GridStore(tmp_path / "f.zarr", mode="a")
    s.initialise(encoder=ENC, tiling=TILING)
    return s


def test_round_trip_and_attrs(store):
    rng = np.random.default_rng(0)
    feats, mask = _slide(rng, 40, 3)  # taller than one chunk
    store.write_slide("S1", feats, mask, {"case_id": "C1", "mpp": [0.25, 0.25], "stride_level0": 512.0,
                                          "origin_level0": [1024.0, 512.0]})
    r = GridStore(store.path)
    assert r.attrs["schema"] == SCHEMA and r.attrs["encoder"]["dim"] == 8 and r.attrs["tiling"] == TILING
    f, m = r.read("S1")
    assert f.dtype == np.float16 and f.shape == (40, 3, 8) and m.dtype == bool
    assert (m == mask).all()
    np.testing.assert_allclose(f[mask], feats[mask].astype(np.float16))
    assert (f[~mask] == 0).all()  # empty cells are 0
    a = r.slide_attrs("S1")
    assert a["status"] == "complete" and a["grid_shape"] == [40, 3] and a["n_tiles"] == int(mask.sum())
    assert a["case_id"] == "C1" and a["origin_level0"] == [1024.0, 512.0]
    arr, _ = r.arrays("S1")
    assert arr.chunks == (32, 3, 8)  # whole D per chunk


def test_crash_mid_write_never_leaves_a_complete_slide(store):
    rng = np.random.default_rng(1)
    store.write_slide("S1", *_slide(rng), {})

    class CrashingStore(GridStore):
        """Dies after the features are on disk, before the mask: a crash in the middle of a slide."""

        @staticmethod
        def _write_array(group, name, data, chunks, dims):
            if name == "mask":
                raise OSError("disk full")
            GridStore._write_array(group, name, data, chunks, dims)

    crashing = CrashingStore(store.path, "a")
    with pytest.raises(OSError):
        crashing.write_slide("S2", *_slide(rng), {})
    with pytest.raises(OSError):
        crashing.write_slide("S1", *_slide(rng), {})  # rewriting a complete slide and crashing
    r = GridStore(store.path)
    assert r.slides() == {"S1": "writing", "S2": "writing"}
    assert r.complete_slides() == []
    with pytest.raises(KeyError, match="not complete"):
        r.read("S2")


def test_manifest_upsert_is_atomic_and_typed(store):
    row = {"slide_id": "S1", "status": "failed", "error": "slide S1: boom", "n_tiles": 0, "H": 0, "W": 0,
           "seconds": 0.5}
    store.update_manifest([row, {**row, "slide_id": "S2"}])
    store.update_manifest([{**row, "status": "complete", "error": "", "n_tiles": 9, "H": 3, "W": 4}])
    df = GridStore(store.path).manifest()
    assert list(df.columns) == ["slide_id", "status", "error", "n_tiles", "H", "W", "seconds"]
    assert df.slide_id.tolist() == ["S1", "S2"] and df.status.tolist() == ["complete", "failed"]
    assert df.n_tiles.tolist() == [9, 0] and df.n_tiles.dtype == np.int64
    assert not list(store.path.glob(".*tmp"))  # no temp file left behind


def test_reconcile_lists_complete_slides_the_manifest_missed(store):
    """Ctrl-C between a slide's "complete" and its manifest row: the next run's reconcile mends the row."""
    rng = np.random.default_rng(3)
    feats, mask = _slide(rng, 6, 4)
    store.write_slide("S1", *_slide(rng), {})
    store.update_manifest([{"slide_id": "S1", "status": "complete", "error": "", "n_tiles": 1, "H": 5, "W": 7,
                            "seconds": 1.0}])
    store.write_slide("S2", feats, mask, {})  # complete on disk, never listed
    store.write_slide("S3", *_slide(rng), {})  # complete on disk, listed as failed by an earlier run
    store.update_manifest([{"slide_id": "S3", "status": "failed", "error": "x", "n_tiles": 0, "H": 0, "W": 0,
                            "seconds": 0.0}])
    assert store.reconcile_manifest() == ["S2", "S3"]
    df = store.manifest().set_index("slide_id")
    assert df.loc["S2", "status"] == "complete" and df.loc["S2", "n_tiles"] == int(mask.sum())
    assert (df.loc["S2", "H"], df.loc["S2", "W"]) == (6, 4)
    assert df.loc["S3", "status"] == "complete" and df.loc["S3", "error"] == ""
    assert df.loc["S1", "seconds"] == 1.0  # rows that were right are untouched
    assert store.reconcile_manifest() == []


def test_reconcile_writes_the_manifest_when_the_first_slide_beat_it(store):
    """A run killed between its first slide's "complete" and the first manifest write leaves no manifest file:
    the next run's reconcile must list that slide, or the upserts of the new slides would leave it out."""
    rng = np.random.default_rng(4)
    store.write_slide("S1", *_slide(rng), {})
    assert not (store.path / "_manifest.parquet").exists()
    assert store.reconcile_manifest() == ["S1"]
    store.update_manifest([{"slide_id": "S2", "status": "failed", "error": "x", "n_tiles": 0, "H": 0, "W": 0,
                            "seconds": 0.0}])
    assert store.manifest().set_index("slide_id")["status"].to_dict() == {"S1": "complete", "S2": "failed"}


def test_channel_stats_match_numpy(store):
    rng = np.random.default_rng(2)
    kept = []
    for k in range(3):
        feats, mask = _slide(rng, 6 + k, 50)
        feats = feats * (k + 1) + 3
        store.write_slide(f"S{k}", feats, mask, {})
        kept.append(feats.astype(np.float16).astype(np.float64)[mask])
    store.write_slide("S9", *_slide(rng), {})
    allf = np.concatenate(kept)
    mean, std = channel_stats(store.path, slides=["S0", "S1", "S2"])
    np.testing.assert_allclose(mean, allf.mean(0), rtol=1e-5)
    np.testing.assert_allclose(std, allf.std(0), rtol=1e-4)
    mean_all, _ = channel_stats(store.path)
    assert not np.allclose(mean_all, mean)


@pytest.mark.parametrize("bad", ["../x", "a/b", "..", ".hidden", "", "x\\y", " pad", "__zarr"])
def test_unsafe_slide_ids_are_rejected(store, bad):
    with pytest.raises(StoreError):
        check_slide_id(bad)
    with pytest.raises(StoreError):
        store.write_slide(bad, np.zeros((1, 1, 8)), np.ones((1, 1), bool), {})
    assert not (store.path.parent / "x").exists()


def test_ids_that_are_fine():
    for ok in ["TCGA-AA-3514-01Z-00-DX1.2c5d3e8f", "slide 7", "S_1+2"]:
        assert check_slide_id(ok) == ok


def test_refuses_to_mix_encoders_unless_overwrite(store):
    store.write_slide("S1", *_slide(np.random.default_rng(3)), {})
    with pytest.raises(StoreError, match="encoder"):
        GridStore(store.path, "a").initialise(encoder={**ENC, "name": "other"}, tiling=TILING)
    s = GridStore(store.path, "a")
    s.initialise(encoder={**ENC, "name": "other"}, tiling=TILING, overwrite=True)
    assert s.complete_slides() == [] and s.attrs["encoder"]["name"] == "other"


def test_read_only_store_cannot_write(store):
    with pytest.raises(StoreError, match="read-only"):
        GridStore(store.path).write_slide("S1", np.zeros((1, 1, 8)), np.ones((1, 1), bool), {})
    with pytest.raises(StoreError, match="not a feature store"):
        GridStore(store.path / "nothing")
