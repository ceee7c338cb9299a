"""TransMIL: Nyström attention against exact softmax attention, PPEG on the real grid, gradients,
the attention map, and a tiny model learning a separable task."""

import torch
import torch.nn.functional as F

from gigamamba.models import create_model
from gigamamba.models.nystrom import iterative_pinv, nystrom_attention, segment_means
from gigamamba.models.transmil import PPEG


def smooth_tokens(heads, n, d, gen, scale):
    """Tokens that vary smoothly along the sequence (random low-frequency sinusoids): the case where
    segment-mean landmarks summarise their segments well."""
    t = torch.linspace(0, 1, n, dtype=torch.float64)[None, :, None]
    freq = 3 * torch.randn(heads, 1, d, generator=gen, dtype=torch.float64)
    phase = 6.3 * torch.rand(heads, 1, d, generator=gen, dtype=torch.float64)
    return scale * torch.sin(t * freq + phase)


def exact_attention(q, k, v):
    attn = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    return attn @ v, attn[..., 0, :]


def test_nystrom_is_close_to_softmax_attention_with_many_landmarks():
    g = torch.Generator().manual_seed(0)
    heads, n, d = 2, 256, 16
    q, k = smooth_tokens(heads, n, d, g, 3.0), smooth_tokens(heads, n, d, g, 3.0)
    v = torch.randn(heads, n, d, generator=g, dtype=torch.float64)
    exact, row = exact_attention(q, k, v)
    # What ignoring the attention (a plain mean of v) would miss: the scale the error is judged on.
    trivial = (exact - v.mean(1, keepdim=True)).abs().max()
    out, row_n = nystrom_attention(q, k, v, n_landmarks=64)  # the paper's 6 pinv iterations
    assert (out - exact).abs().max() < 0.1 * trivial
    assert (row_n - row).abs().max() < 0.1 * row.max()
    # With the pseudo-inverse converged, F A⁺ B is exact for this low-rank case: the formula is right
    # and the remaining error above is the 6-iteration pseudo-inverse, not the landmarks.
    out, row_n = nystrom_attention(q, k, v, n_landmarks=64, pinv_iters=20)
    assert (out - exact).abs().max() < 1e-3 * trivial
    assert (row_n - row).abs().max() < 1e-4 * row.max()
    # Too few landmarks for the sequence's variety do worse: the test can tell good from bad.
    few, _ = nystrom_attention(q, k, v, n_landmarks=2, pinv_iters=20)
    assert (few - exact).abs().max() > 10 * (out - exact).abs().max()


def test_short_sequences_get_exact_softmax_attention():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(3, 40, 8, generator=g, dtype=torch.float64) for _ in range(3))
    exact, row = exact_attention(q, k, v)
    for m in (40, 64):  # n == m and n < m
        out, row_n = nystrom_attention(q, k, v, n_landmarks=m)
        assert torch.allclose(out, exact, rtol=0, atol=1e-14)
        assert torch.allclose(row_n, row, rtol=0, atol=1e-14)
    out, _ = nystrom_attention(q, k, v, n_landmarks=39)  # one token longer than m: approximate
    assert not torch.allclose(out, exact, rtol=0, atol=1e-6)


def test_segment_means_split_any_length_into_contiguous_segments():
    x = torch.arange(10, dtype=torch.float64).view(10, 1)
    assert segment_means(x, 4).flatten().tolist() == [1.0, 3.5, 6.0, 8.5]  # sizes 3, 2, 3, 2
    y = torch.randn(2, 12, 5, dtype=torch.float64)
    assert torch.allclose(segment_means(y, 4), y.view(2, 4, 3, 5).mean(2))


def test_iterative_pinv_inverts_a_softmax_matrix():
    g = torch.Generator().manual_seed(2)
    a = torch.softmax(torch.randn(2, 16, 16, generator=g, dtype=torch.float64), -1)
    z = iterative_pinv(a, iters=12)
    assert torch.allclose(z, torch.linalg.pinv(a), atol=1e-6)
    assert torch.allclose(a @ z @ a, a, atol=1e-8)


def test_ppeg_mixes_grid_neighbours_not_raster_neighbours():
    torch.manual_seed(0)
    ppeg = PPEG(4).double()
    cells = torch.tensor([(r, c) for r in range(8) for c in range(8)])
    tokens = torch.randn(64, 4, dtype=torch.float64)
    out = ppeg(tokens, cells)
    at = {tuple(c.tolist()): i for i, c in enumerate(cells)}

    def changed_by(cell):
        t = tokens.clone()
        t[at[cell]] += 1.0
        return not torch.allclose(ppeg(t, cells)[at[(2, 2)]], out[at[(2, 2)]])

    assert changed_by((3, 2))       # directly below: one grid row, eight raster steps away
    assert changed_by((5, 5))       # corner of the 7x7 reach
    assert not changed_by((6, 2))   # four rows away: out of reach, though close in a 1D sequence
    assert not changed_by((2, 6))


def tiny(**kw):
    torch.manual_seed(0)
    return create_model("transmil", 8, 2, **{"d_model": 16, "n_heads": 2, "n_landmarks": 8, "dropout": 0.0, **kw})


def test_gradient_reaches_embedding_both_layers_ppeg_and_class_token():
    model = tiny()
    feats, mask = torch.randn(2, 5, 6, 8), torch.rand(2, 5, 6) > 0.2  # > 8 tokens: the Nyström path
    F.cross_entropy(model(feats, mask), torch.tensor([0, 1])).backward()
    params = {"embed": model.embed[0].weight, "cls_token": model.cls_token}
    for i, layer in enumerate((model.layer1, model.layer2), 1):
        params |= {f"layer{i}.qkv": layer.qkv.weight, f"layer{i}.out": layer.out.weight,
                   f"layer{i}.value_conv": layer.value_conv.weight}
    params |= {f"ppeg.conv{k}": conv.weight for k, conv in zip((7, 5, 3), model.ppeg.convs)}
    for name, p in params.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_attention_map_is_a_distribution_over_tissue():
    g = torch.Generator().manual_seed(3)
    feats = torch.randn(3, 6, 7, 8, generator=g)
    mask = torch.rand(3, 6, 7, generator=g) > 0.4
    mask[2] = False  # a slide with no tissue: finite logits, an all-zero map
    for n_landmarks in (8, 256):  # Nyström and exact attention
        model = tiny(n_landmarks=n_landmarks).eval()
        logits = model(feats, mask)
        attn = model.last_attention
        assert attn.shape == (3, 6, 7) and not attn.requires_grad
        assert torch.isfinite(logits).all()
        assert attn[~mask].abs().sum() == 0 and (attn >= 0).all()
        assert torch.allclose(attn[:2].sum(dim=(1, 2)), torch.ones(2), atol=1e-5)
        assert attn[2].sum() == 0
        assert attn[0][mask[0]].std() > 0  # not a uniform placeholder


def test_a_batch_without_tissue_still_uses_every_parameter():
    # DDP (find_unused_parameters=False) fails on the next step if a rank's batch left any parameter out
    # of the graph: an empty-tissue slide must reach the PPEG convs too, with a zero gradient.
    model = tiny()
    logits = model(torch.randn(1, 4, 5, 8), torch.zeros(1, 4, 5, dtype=torch.bool))
    F.cross_entropy(logits, torch.tensor([0])).backward()
    assert torch.isfinite(logits).all()
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert not missing, missing


def make_task(n, gen):
    """Feature 0 of every tissue tile is -1 on label-1 slides and +1 on label-0 slides: separable by a
    mean. This sign is the one the seeded initial model gets wrong, so the test sees learning."""
    labels = torch.arange(n) % 2
    feats = 0.5 * torch.randn(n, 5, 5, 8, generator=gen)
    feats[..., 0] += 1 - 2 * labels.view(n, 1, 1).float()
    return feats, torch.rand(n, 5, 5, generator=gen) > 0.3, labels


def test_tiny_transmil_learns_a_separable_task():
    # One thread: these tiny ops gain nothing from two, and beside a CI run two threads were ~4x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        g = torch.Generator().manual_seed(4)
        (feats, mask, labels), (t_feats, t_mask, t_labels) = make_task(8, g), make_task(32, g)
        model = tiny()  # 18 tokens on average > 8 landmarks: trains through the Nyström path

        def accuracy():
            with torch.no_grad():
                return (model(t_feats, t_mask).argmax(-1) == t_labels).float().mean().item()

        before = accuracy()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        losses = []
        for _ in range(20):
            opt.zero_grad()
            loss = F.cross_entropy(model(feats, mask), labels)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        model.eval()
        assert before < 0.5, before
        assert losses[-1] < 0.05 * losses[0], losses
        assert accuracy() >= 0.95
    finally:
        torch.set_num_threads(threads)
