import numpy as np
import pandas as pd
import pytest
import torch

from gigamamba.cohorts import read_cohort
from gigamamba.features.store import GridStore
from gigamamba.models import create_model
from gigamamba.train.data import GridDataset, collate_grids, feature_dim, training_stats
from gigamamba.train.toy import write_toy_cohort


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    csv, store = write_toy_cohort(tmp_path_factory.mktemp("d"), "spatial", n_slides=6, dim=6, grid=5)
    return read_cohort(csv), store


def test_dataset_reads_grids_and_targets(toy):
    cohort, store = toy
    ds = GridDataset(store, cohort.iloc[[4, 1]], "classification")
    feats, mask, target, i = ds[0]
    ref_f, ref_m = GridStore(store).read(cohort.iloc[4]["slide_id"])
    assert feats.dtype == torch.float32 and torch.equal(mask, torch.from_numpy(ref_m))
    np.testing.assert_allclose(feats.numpy(), ref_f.astype(np.float32))
    assert target == {"y": int(cohort.iloc[4]["y"])} and i == 0
    assert feature_dim(store) == 6


def test_normalisation_uses_training_cells_only(toy):
    cohort, store = toy
    train = cohort["slide_id"].iloc[:3]
    mean, std = training_stats(store, train)
    s = GridStore(store)
    cells = np.concatenate([f[m].astype(np.float64) for f, m in (s.read(x) for x in train)])
    np.testing.assert_allclose(mean, cells.mean(0), rtol=1e-3, atol=1e-3)
    ds = GridDataset(store, cohort.iloc[:3], "classification", (mean, std))
    feats, mask, _, _ = ds[0]
    assert torch.all(feats[~mask] == 0)


def test_packed_batch_matches_single_slides(toy):
    """Padding (zero features, False mask, sizes) must not change any slide's logits."""
    cohort, store = toy
    ds = GridDataset(store, cohort, "classification")
    items = [ds[0], ds[1], ds[2]]
    feats, mask, sizes, targets, index = collate_grids(items)
    H = max(f.shape[0] for f, *_ in items)
    W = max(f.shape[1] for f, *_ in items)
    assert feats.shape[:3] == (3, H, W) and sizes.tolist() == [[f.shape[0], f.shape[1]] for f, *_ in items]
    for b, (f, m, _, _) in enumerate(items):
        assert not mask[b, f.shape[0]:, :].any() and not mask[b, :, f.shape[1]:].any()
    torch.manual_seed(0)
    model = create_model("mamba2d", 6, 2, d_model=16, d_state=4).eval()
    with torch.no_grad():
        packed = model(feats, mask, sizes=sizes)
        for b, (f, m, _, _) in enumerate(items):
            alone = model(f[None], m[None], sizes=torch.tensor([[f.shape[0], f.shape[1]]]))
            torch.testing.assert_close(packed[b], alone[0], rtol=1e-4, atol=1e-5)
    assert targets["y"].tolist() == [t["y"] for *_, t, _ in items]
