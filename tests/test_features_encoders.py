"""Encoder registry over timm: CLAM's truncated ResNet-50, any timm name, weights files, determinism."""

import numpy as np
import pytest
import torch

from gigamamba.features.encoders import EncoderError, create_encoder, list_encoders, sha256_file


@pytest.fixture(scope="module")
def tiles():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (3, 48, 48, 3), dtype=np.uint8)


def test_resnet50_trunc_is_layer3_pooled_1024d(tiles):
    enc = create_encoder("resnet50-trunc", weights="random", input_px=48, device="cpu")
    assert "resnet50-trunc" in list_encoders()
    info = enc.info()
    assert info["dim"] == 1024 and info["name"] == "resnet50-trunc" and info["weights"] == "random"
    assert info["mean"] == pytest.approx([0.485, 0.456, 0.406]) and info["std"] == pytest.approx([0.229, 0.224, 0.225])
    out = enc.embed(tiles)
    assert out.shape == (3, 1024) and out.dtype == np.float32 and np.isfinite(out).all()
    assert not hasattr(enc.model.layer4, "weight") and len(list(enc.model.layer4.parameters())) == 0


def test_any_timm_name_and_random_weights_are_identical_everywhere(tiles):
    a = create_encoder("test_resnet", weights="random", input_px=32, device="cpu")
    b = create_encoder("test_resnet", weights="random", input_px=32, device="cpu")
    fa, fb = a.embed(tiles), b.embed(tiles)
    assert fa.shape == (3, a.dim) and a.dim == a.model.num_features
    np.testing.assert_array_equal(fa, fb)  # every Ray actor builds the same "random" encoder
    assert not np.allclose(fa[0], fa[1])   # and it does look at the pixels (resized to input_px)


def test_weights_file_is_loaded_and_its_sha256_recorded(tmp_path, tiles):
    src = create_encoder("test_resnet", weights="random", input_px=32, device="cpu")
    with torch.no_grad():
        for p in src.model.parameters():
            p.mul_(0.5)
    path = tmp_path / "w.pth"
    torch.save({"state_dict": src.model.state_dict()}, path)
    enc = create_encoder("test_resnet", weights=str(path), input_px=32, device="cpu")
    assert enc.info()["weights_sha256"] == sha256_file(path) and len(sha256_file(path)) == 64
    np.testing.assert_allclose(enc.embed(tiles), src.embed(tiles), rtol=1e-5, atol=1e-6)
    assert not np.allclose(enc.embed(tiles), create_encoder("test_resnet", "random", 32, "cpu").embed(tiles))


def test_bad_names_and_weights_fail_clearly(tmp_path):
    with pytest.raises(EncoderError, match="unknown encoder"):
        create_encoder("no-such-net", weights="random", device="cpu")
    with pytest.raises(EncoderError, match="neither"):
        create_encoder("test_resnet", weights=str(tmp_path / "missing.pth"), device="cpu")
    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, wrong)
    with pytest.raises(EncoderError, match="lacks"):
        create_encoder("test_resnet", weights=str(wrong), device="cpu")


def test_meta_probe_matches_a_real_build_and_still_checks_weights(tmp_path):
    # embed_cohort probes the encoder on the meta device before any write: same attrs, same refusals
    real = create_encoder("resnet18", "random", 64, device="cpu")
    probe = create_encoder("resnet18", "random", 64, device="meta")
    assert probe.info() == real.info()
    assert all(p.is_meta for p in probe.model.parameters())
    path = tmp_path / "w.pt"
    torch.save(real.model.state_dict(), path)
    assert create_encoder("resnet18", str(path), 64, device="meta").info() == \
        create_encoder("resnet18", str(path), 64, device="cpu").info()
    bad = tmp_path / "bad.pt"
    torch.save({k: v for k, v in list(real.model.state_dict().items())[3:]}, bad)
    with pytest.raises(EncoderError, match="lacks"):
        create_encoder("resnet18", str(bad), 64, device="meta")


def test_meta_probe_accepts_half_precision_weight_files(tmp_path):
    # pathology encoders often ship in fp16; a layer with a bias must not see fp32 input beside fp16 weights
    real = create_encoder("test_vit", "random", 64, device="cpu")
    path = tmp_path / "half.pt"
    torch.save({k: v.half() for k, v in real.model.state_dict().items()}, path)
    assert create_encoder("test_vit", str(path), 64, device="meta").info() == \
        create_encoder("test_vit", str(path), 64, device="cpu").info()


def test_gpu_wait_is_checked(tiles):
    enc = create_encoder("test_resnet", weights="random", input_px=32, device="cpu")
    enc.gpu_wait = "sleep"
    with pytest.raises(ValueError, match="gpu_wait must be one of"):
        enc.embed(tiles)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_blocking_gpu_wait_gives_the_spin_features_from_concurrent_threads():
    """The pinned, event-waited path (ingest.gpu_wait: block) against torch's synchronous copies: the same
    features, also when two threads embed at once as the ingest actor's two calls do, each batch its own (the
    pinned buffers come from torch's caching host allocator and must not be reused while a copy is in flight)."""
    import threading

    rng = np.random.default_rng(1)
    batches = [rng.integers(0, 256, (64, 64, 64, 3), dtype=np.uint8) for _ in range(8)]
    enc = create_encoder("resnet50-trunc", weights="random", input_px=64)
    assert enc.device.type == "cuda" and enc.gpu_wait == "block"
    enc.gpu_wait = "spin"
    want = [enc.embed(b).copy() for b in batches]
    enc.gpu_wait = "block"
    got: dict[int, list] = {0: [], 1: []}

    def run(t):
        for _ in range(3):
            for k in range(t, len(batches), 2):
                got[t].append((k, enc.embed(batches[k]).copy()))

    threads = [threading.Thread(target=run, args=(t,)) for t in (0, 1)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert sum(len(v) for v in got.values()) == 3 * len(batches)
    for k, feats in got[0] + got[1]:
        np.testing.assert_allclose(feats, want[k], rtol=0, atol=1e-3 * float(np.abs(want[k]).max()))
    assert not np.allclose(want[0], want[1])  # the batches differ, so a mixed-up buffer would show
