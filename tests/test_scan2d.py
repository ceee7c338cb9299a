"""scan2d (vectorised PyTorch path, and whatever dispatch picks on CPU) against the loop oracle."""

import pytest
import torch

from gigamamba.ops import scan2d, scan2d_ref, scan2d_torch
from gigamamba.ops.scan2d import linear_scan

NAMES = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]


def make_inputs(n_batch, n_ch, n_state, H, W, groups=None, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    bc_shape = (n_batch, n_state, H, W) if groups is None else (n_batch, groups, n_state, H, W)
    return {
        "u": r(n_batch, n_ch, H, W),
        "delta": 0.5 * r(n_batch, n_ch, H, W),
        "A": -(torch.rand(n_ch, n_state, generator=g, dtype=dtype) + 0.05),
        "B": r(*bc_shape),
        "C": r(*bc_shape),
        "D": r(n_ch),
        "z": r(n_batch, n_ch, H, W),
        "delta_bias": 0.3 * r(n_ch),
    }


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def forward_and_grads(fn, inputs, softplus=True, sizes=None):
    leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    out = fn(**leaves, delta_softplus=softplus, sizes=sizes)
    # A cotangent that differs at every (channel, row, column), and depends on nothing else, so a
    # sample gets the same one alone or inside a padded batch.
    _, n_ch, H, W = out.shape
    d, i, j = torch.meshgrid(*(torch.arange(n, dtype=out.dtype) for n in (n_ch, H, W)), indexing="ij")
    weight = torch.sin(1.0 + 0.7 * d + 1.3 * i + 0.9 * j)
    (out * weight).sum().backward()
    # No gradient at all means the input had no influence (A on a 1x1 grid): compare it as zeros.
    return out.detach(), {k: leaves[k].grad if leaves[k].grad is not None else torch.zeros_like(leaves[k])
                          for k in NAMES}


SHAPES = [
    (1, 2, 1, 1, 1),
    (1, 3, 16, 1, 1),
    (2, 3, 16, 1, 11),   # 1 x W: a plain 1D Mamba scan
    (2, 3, 1, 10, 1),    # H x 1
    (2, 4, 1, 7, 13),
    (1, 4, 16, 7, 13),
    (1, 2, 16, 13, 7),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("softplus", [True, False])
def test_forward_and_every_gradient_match_the_oracle(shape, softplus):
    inputs = make_inputs(*shape, seed=sum(shape))
    out_ref, grads_ref = forward_and_grads(scan2d_ref, inputs, softplus)
    out, grads = forward_and_grads(scan2d, inputs, softplus)
    assert rel_err(out, out_ref) < 1e-10
    for name in NAMES:
        assert rel_err(grads[name], grads_ref[name]) < 1e-10, name


def test_per_group_B_and_C_match_the_oracle():
    inputs = make_inputs(2, 6, 4, 5, 6, groups=3)
    out_ref, grads_ref = forward_and_grads(scan2d_ref, inputs)
    out, grads = forward_and_grads(scan2d, inputs)
    assert rel_err(out, out_ref) < 1e-10
    for name in NAMES:
        assert rel_err(grads[name], grads_ref[name]) < 1e-10, name


def test_optional_arguments_can_be_left_out():
    x = make_inputs(1, 3, 4, 4, 5)
    for drop in (["D"], ["z"], ["delta_bias"], ["D", "z", "delta_bias"]):
        kw = {k: v for k, v in x.items() if k not in drop}
        assert rel_err(scan2d(**kw), scan2d_ref(**kw)) < 1e-10


def test_gradcheck_small():
    x = make_inputs(1, 2, 3, 3, 4)
    names = list(x)
    leaves = [x[k].clone().requires_grad_(True) for k in names]

    def fn(*ts):
        return scan2d(**dict(zip(names, ts)), delta_softplus=True)

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-8)


def test_gradcheck_with_sizes():
    x = make_inputs(2, 2, 2, 3, 4)
    sizes = torch.tensor([[3, 2], [1, 4]])
    names = list(x)
    leaves = [x[k].clone().requires_grad_(True) for k in names]
    assert torch.autograd.gradcheck(lambda *ts: scan2d(**dict(zip(names, ts)), sizes=sizes), leaves,
                                    eps=1e-6, atol=1e-8)


def pad_to(t, H, W):
    return torch.nn.functional.pad(t, (0, W - t.shape[-1], 0, H - t.shape[-2]), value=7.0)


def test_mixed_size_batch_equals_each_sample_alone():
    small, tall = make_inputs(1, 3, 4, 5, 9, seed=3), make_inputs(1, 3, 4, 12, 3, seed=4)
    H, W = 12, 9
    batch = {}
    for k in ("u", "delta", "B", "C", "z"):
        # Padding is filled with garbage (7.0): it must not reach any real cell.
        batch[k] = torch.cat([pad_to(small[k], H, W), pad_to(tall[k], H, W)])
    for k in ("A", "D", "delta_bias"):
        batch[k] = small[k]
    tall.update({k: small[k] for k in ("A", "D", "delta_bias")})
    sizes = torch.tensor([[5, 9], [12, 3]])
    out, grads = forward_and_grads(scan2d, batch, sizes=sizes)
    for b, (alone, (h, w)) in enumerate([(small, (5, 9)), (tall, (12, 3))]):
        out_b, grads_b = forward_and_grads(scan2d, alone)
        assert torch.equal(out[b, :, :h, :w], out_b[0]) or rel_err(out[b, :, :h, :w], out_b[0]) < 1e-13
        assert out[b, :, h:, :].abs().sum() == 0 and out[b, :, :, w:].abs().sum() == 0
        for k in ("u", "delta", "B", "C", "z"):
            g = grads[k][b]
            assert rel_err(g[..., :h, :w], grads_b[k][0]) < 1e-12, k
            assert g[..., h:, :].abs().sum() == 0 and g[..., :, w:].abs().sum() == 0, k
    # The oracle agrees on the padded batch too.
    assert rel_err(out, scan2d_ref(**batch, delta_softplus=True, sizes=sizes)) < 1e-10


def test_linear_scan_is_the_sequential_recurrence():
    g = torch.Generator().manual_seed(5)
    a, x = torch.rand(3, 37, generator=g, dtype=torch.float64), torch.randn(3, 37, generator=g, dtype=torch.float64)
    h, ref = torch.zeros(3, dtype=torch.float64), []
    for k in range(37):
        h = a[:, k] * h + x[:, k]
        ref.append(h)
    assert rel_err(linear_scan(a, x, dim=-1), torch.stack(ref, -1)) < 1e-13


def test_channel_chunking_with_checkpointing_keeps_gradients(monkeypatch):
    import sys

    mod = sys.modules["gigamamba.ops.scan2d"]  # the package re-exports a function of the same name

    x = make_inputs(1, 5, 4, 6, 7, groups=5)
    out_ref, grads_ref = forward_and_grads(scan2d_torch, x)
    monkeypatch.setattr(mod, "_CHUNK_ELEMENTS", 2 * 4 * 6 * 7)  # two channels per chunk
    out, grads = forward_and_grads(scan2d_torch, x)
    assert rel_err(out, out_ref) < 1e-13
    for name in NAMES:
        assert rel_err(grads[name], grads_ref[name]) < 1e-12, name


def test_float32_inputs_stay_close_and_keep_their_dtype():
    x64 = make_inputs(1, 4, 16, 9, 11)
    x32 = {k: v.float() for k, v in x64.items()}
    out = scan2d(**x32, delta_softplus=True)
    assert out.dtype == torch.float32
    assert rel_err(out.double(), scan2d_ref(**x64, delta_softplus=True)) < 1e-5


def test_bad_shapes_give_one_clear_error():
    x = make_inputs(1, 3, 4, 4, 5)
    x["B"] = x["B"][..., :3]
    with pytest.raises(ValueError, match="B must be"):
        scan2d(**x)


def test_unknown_carry_layout_is_refused(monkeypatch):
    from gigamamba.ops import scan2d_cuda

    monkeypatch.setattr(scan2d_cuda, "CARRIES", "pass")  # a typo must not silently pick a layout
    with pytest.raises(ValueError, match=r"one of \['passes', 'wavefront'\], got 'pass'"):
        scan2d_cuda._layout()
    for name, code in (("passes", 0), ("wavefront", 1)):
        monkeypatch.setattr(scan2d_cuda, "CARRIES", name)
        assert scan2d_cuda._layout() == code
