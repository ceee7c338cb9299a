"""MIL models: masking, padding, dt init, survival head."""

import math

import pytest
import torch
import torch.nn.functional as F

from gigamamba.models import create_model, list_models, nll_survival_loss, survival_curve, survival_risk

IN_DIM = 12
CONFIGS = [
    ("mamba2d", {}),
    ("mamba2d", {"conv": "dw2d", "directions": 4, "n_layers": 2}),
    ("mamba1d", {}),
    ("abmil", {}),
    ("meanpool", {}),
    ("transmil", {}),                   # exact attention: fewer tokens than the 256 landmarks
    ("transmil", {"n_landmarks": 4}),   # the Nyström approximation
]


def make_model(name, **kw):
    torch.manual_seed(0)
    return create_model(name, IN_DIM, 3, d_model=16, d_state=4, **kw).double().eval()


@pytest.mark.parametrize("name,kw", CONFIGS)
def test_features_in_masked_out_cells_change_nothing(name, kw):
    model = make_model(name, **kw)
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(2, 6, 7, IN_DIM, generator=g, dtype=torch.float64)
    mask = torch.rand(2, 6, 7, generator=g) > 0.4
    out = model(feats, mask)
    attn = model.last_attention
    scrambled = torch.where(mask.unsqueeze(-1), feats, 100 * torch.randn_like(feats))
    assert torch.equal(model(scrambled, mask), out)
    # ... while a change in a tissue cell does change it (the test can fail).
    bumped = feats.clone()
    bumped[mask] += 1.0
    assert not torch.allclose(model(bumped, mask), out)
    assert attn[~mask].abs().sum() == 0
    assert torch.allclose(attn.sum(dim=(1, 2)), torch.ones(2, dtype=attn.dtype))


@pytest.mark.parametrize("name,kw", CONFIGS)
def test_a_padded_batch_gives_each_slide_what_it_gives_alone(name, kw):
    model = make_model(name, **kw)
    g = torch.Generator().manual_seed(2)
    grids = [(5, 9), (8, 3)]
    alone, feats, masks = [], torch.zeros(2, 8, 9, IN_DIM, dtype=torch.float64), torch.zeros(2, 8, 9, dtype=torch.bool)
    for b, (h, w) in enumerate(grids):
        f = torch.randn(1, h, w, IN_DIM, generator=g, dtype=torch.float64)
        m = torch.rand(1, h, w, generator=g) > 0.3
        alone.append(model(f, m))
        feats[b, :h, :w], masks[b, :h, :w] = f[0], m[0]
    out = model(feats, masks, sizes=torch.tensor(grids))
    for b in range(2):
        assert torch.allclose(out[b], alone[b][0], rtol=1e-10, atol=1e-12), (name, b)


def test_registry_lists_the_models_and_rejects_unknown_names():
    assert {"mamba2d", "mamba1d", "abmil", "meanpool", "transmil"} <= set(list_models())
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        create_model("nope", 4, 2)


def test_dt_initialisation_survives_the_model_init():
    model = create_model("mamba2d", IN_DIM, 2, d_model=32, n_layers=2)
    for layer in model.layers:
        dt = F.softplus(layer.dt_proj.bias.detach())
        assert dt.min() >= 1e-4 and dt.max() <= 0.1 + 1e-6
        assert dt.std() > 0  # log-uniform, not a constant left by a zeroing init
        assert layer.A_log.min() == 0 and math.isclose(layer.A_log.max().item(), math.log(16), rel_tol=1e-6)


def test_multi_layer_mamba2d_trains_every_layer():
    model = create_model("mamba2d", IN_DIM, 2, d_model=16, d_state=4, n_layers=3)
    feats, mask = torch.randn(1, 4, 5, IN_DIM), torch.ones(1, 4, 5, dtype=torch.bool)
    F.cross_entropy(model(feats, mask), torch.tensor([1])).backward()
    for i, layer in enumerate(model.layers):
        for name in ("in_proj", "x_proj", "dt_proj", "out_proj"):
            assert getattr(layer, name).weight.grad.abs().sum() > 0, (i, name)
        assert layer.A_log.grad.abs().sum() > 0


def test_nll_survival_loss_by_hand():
    logits = torch.tensor([[0.2, -0.5, 1.0, 0.0], [-1.0, 0.3, 0.1, 0.4]])
    h = torch.sigmoid(logits)
    S = torch.cumprod(1 - h, 1)
    # patient 0: died in bin 2; patient 1: censored in bin 1.
    expected = (-(torch.log(S[0, 1]) + torch.log(h[0, 2])) - torch.log(S[1, 1])) / 2
    loss = nll_survival_loss(logits, torch.tensor([2, 1]), torch.tensor([0, 1]))
    assert torch.isclose(loss, expected)
    assert torch.allclose(survival_risk(logits), -S.sum(1))
    assert torch.allclose(survival_curve(logits), S)


def test_higher_hazard_means_higher_risk():
    low, high = torch.full((1, 4), -2.0), torch.full((1, 4), 2.0)
    assert survival_risk(high) > survival_risk(low)
