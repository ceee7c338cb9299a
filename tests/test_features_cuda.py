"""The encoder on a GPU: features equal to a plain `.cpu()` copy, and the wait for them does not spin a core.

Skipped without CUDA (the CPU machine); run on the lent GPU machines (README).
"""

import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def encoder():
    from gigamamba.features.encoders import create_encoder

    return create_encoder("resnet50-trunc", "random", 224, device="cuda")


def _tiles(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 224, 224, 3), dtype=np.uint8)


def test_embed_gives_what_a_plain_copy_gives(encoder):
    tiles = _tiles(64)
    got = encoder.embed(tiles)
    want = encoder.forward(tiles).cpu().numpy()
    assert got.dtype == np.float32 and got.shape == (64, encoder.dim)
    np.testing.assert_array_equal(got, want)


def test_waiting_for_the_gpu_leaves_the_cpu_free(encoder):
    """The actor shares its node's cores with the decoding tasks (it reserves none): while the GPU runs a batch,
    the calling thread must sleep. With `.cpu()`'s spin-wait (or a copy from pageable memory, which waits
    the same way for the batch before) the process's CPU time is about its wall time; here the host's own
    work (pinning 38 MB, launching the kernels) is a fraction of the GPU's ~25 ms a batch."""
    tiles = _tiles(256)
    encoder.embed(tiles)  # warm: cuDNN autotuning, the pinned-memory cache
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(20):
        encoder.embed(tiles)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    assert cpu < 0.7 * wall, f"the process used {cpu:.2f} s of CPU in {wall:.2f} s: the wait spins"
