"""The native resnet50-trunc (plain torch) against timm's resnet50 with layer4 removed: keys, outputs, imports."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from gigamamba.features.encoders import EncoderError, create_encoder, sha256_file
from gigamamba.features.resnet import ResNet50Trunc


def _timm_trunc(seed: int = 1):
    import timm

    torch.manual_seed(seed)
    full = timm.create_model("resnet50", num_classes=0)
    # timm zero-initialises each block's last BN weight and leaves BN statistics at 0/1: perturb every BN so
    # the comparison exercises all of them (residual branches, downsample, running stats), not just the stem
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in full.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(1 + 0.2 * torch.randn(n, generator=g))
                m.bias.copy_(0.2 * torch.randn(n, generator=g))
                m.running_mean.copy_(0.2 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))
    state = {k: v.clone() for k, v in full.state_dict().items()}
    full.layer4 = torch.nn.Identity()
    return full.eval(), state


@pytest.fixture(scope="module")
def timm_model():
    return _timm_trunc()


@pytest.fixture(scope="module")
def tiles():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)


def test_native_matches_timm_truncated_resnet50(timm_model):
    ref, state = timm_model
    assert any(k.startswith("layer4.") for k in state)  # the full ResNet-50's keys, layer4 included
    native = ResNet50Trunc().eval()
    missing, unexpected = native.load_state_dict(state, strict=False)
    assert missing == []
    assert unexpected and all(k.startswith(("layer4.", "fc.")) for k in unexpected)
    # every native key is a timm key (names match exactly, nothing renamed)
    assert set(native.state_dict()) == {k for k in state if not k.startswith(("layer4.", "fc."))}
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = native(x), ref(x)
    assert a.shape == (2, 1024) and b.shape == (2, 1024)
    assert a.abs().max() > 1e-3  # not a trivially-zero output
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_random_native_encoder_is_deterministic(tiles):
    a = create_encoder("resnet50-trunc", "random", 64, device="cpu")
    b = create_encoder("resnet50-trunc", "random", 64, device="cpu")
    assert a.dim == b.dim == 1024 and isinstance(a.model, ResNet50Trunc)
    fa, fb = a.embed(tiles), b.embed(tiles)
    assert fa.shape == (2, 1024) and np.isfinite(fa).all()
    np.testing.assert_array_equal(fa, fb)
    assert not np.allclose(fa[0], fa[1])


def test_timm_weights_file_loads_into_native_encoder(tmp_path, timm_model, tiles):
    ref, state = timm_model
    path = tmp_path / "resnet50_full.pth"
    torch.save(state, path)
    enc = create_encoder("resnet50-trunc", weights=str(path), input_px=64, device="cpu")
    assert isinstance(enc.model, ResNet50Trunc)
    info = enc.info()
    assert info["weights_sha256"] == sha256_file(path) and info["dim"] == 1024
    assert info["mean"] == pytest.approx([0.485, 0.456, 0.406]) and info["std"] == pytest.approx([0.229, 0.224, 0.225])
    # the same preprocessing as Encoder.embed, through timm's truncated model
    x = torch.from_numpy(tiles).permute(0, 3, 1, 2).float()
    mean = torch.tensor(info["mean"]).view(1, 3, 1, 1) * 255
    std = torch.tensor(info["std"]).view(1, 3, 1, 1) * 255
    with torch.no_grad():
        expect = ref((x - mean) / std).numpy()
    got = enc.embed(tiles)
    np.testing.assert_allclose(got, expect, atol=1e-4, rtol=0)
    assert not np.allclose(got, create_encoder("resnet50-trunc", "random", 64, "cpu").embed(tiles), atol=1e-3)
    # the meta probe accepts the same file, and refuses one lacking parameters
    assert create_encoder("resnet50-trunc", str(path), 64, device="meta").info() == info
    bad = tmp_path / "bad.pth"
    torch.save({k: v for k, v in state.items() if not k.startswith("layer3.5.")}, bad)
    for device in ("cpu", "meta"):
        with pytest.raises(EncoderError, match="lacks"):
            create_encoder("resnet50-trunc", str(bad), 64, device=device)


def test_imagenet_weights_come_from_the_hub_file(monkeypatch, tmp_path, timm_model, tiles):
    """No network: the hub download is replaced by a local safetensors file of timm's layout."""
    import huggingface_hub
    from safetensors.torch import save_file

    ref, state = timm_model
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in state.items() if not k.endswith("num_batches_tracked")}, str(path))
    calls = []

    def fake_download(repo_id, filename, **kw):
        calls.append((repo_id, filename))
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    enc = create_encoder("resnet50-trunc", "imagenet", 64, device="cpu")
    assert calls == [("timm/resnet50.a1_in1k", "model.safetensors")]
    random = create_encoder("resnet50-trunc", "random", 64, device="cpu")
    x = torch.from_numpy(tiles).permute(0, 3, 1, 2).float()
    mean = torch.tensor(enc.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(enc.std).view(1, 3, 1, 1) * 255
    with torch.no_grad():
        expect = ref((x - mean) / std).numpy()
    np.testing.assert_allclose(enc.embed(tiles), expect, atol=1e-4, rtol=0)
    assert not np.allclose(enc.embed(tiles), random.embed(tiles), atol=1e-3)
    # the meta probe still fetches the weights
    assert create_encoder("resnet50-trunc", "imagenet", 64, device="meta").info() == enc.info()
    assert len(calls) == 2
    # a hub file lacking parameters is refused
    save_file({k: v.contiguous() for k, v in state.items() if not k.startswith("layer2.")}, str(path))
    with pytest.raises(EncoderError, match="lacks"):
        create_encoder("resnet50-trunc", "imagenet", 64, device="cpu")


def test_unreachable_hub_raises_encoder_error(monkeypatch):
    import huggingface_hub

    def offline(*a, **kw):
        raise OSError("Name or service not known")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    for device in ("cpu", "meta"):
        with pytest.raises(EncoderError, match="could not fetch pretrained weights"):
            create_encoder("resnet50-trunc", "imagenet", 64, device=device)


def test_building_native_encoder_imports_neither_timm_nor_torchvision():
    code = (
        "import sys\n"
        "from gigamamba.features.encoders import create_encoder\n"
        "enc = create_encoder('resnet50-trunc', 'random', 32, device='cpu')\n"
        "assert enc.dim == 1024\n"
        "bad = sorted(m for m in ('timm', 'torchvision') if m in sys.modules)\n"
        "assert not bad, bad\n"
        "assert 'timm' not in sys.modules and 'torchvision' not in sys.modules\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
