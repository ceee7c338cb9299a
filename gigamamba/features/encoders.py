"""Tile encoders: a small registry over timm, plus a native (plain torch) resnet50-trunc.

    encoder = create_encoder("resnet50-trunc", weights="imagenet")     # or any timm model name
    feats = encoder.embed(tiles)          # tiles uint8 (N, H, W, 3) -> float32 (N, encoder.dim)
    encoder.info()                        # {name, dim, weights, input_px, mean, std, ...} for the store attrs

Registered names (timm names work as well, as global-average-pooled feature extractors):
    resnet50-trunc   CLAM's standard: ResNet-50 through layer3, average pooled, 1024-d, ImageNet normalisation.
                     Built natively (features/resnet.py, timm's key names): building it never imports
                     timm/torchvision, which cost ~5.5 s of every encoder actor's start-up. Its "imagenet"
                     weights are timm's resnet50 default, resnet50.a1_in1k, fetched from the HF hub.

weights:
    "imagenet"       the pretrained download (timm's, or the HF hub; needs network access, or a warm HF cache)
    "random"         seeded random initialisation, identical in every worker (tests, the demo)
    a file path      a state dict (.pth/.pt/.bin/.safetensors); its sha256 goes into the store attrs

On CUDA the encoder runs channels_last under autocast (bfloat16 where supported, else float16).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GPU_WAITS = ("block", "spin")  # Encoder.gpu_wait
RANDOM_SEED = 0  # every worker builds the same "random" encoder, so features are comparable across slides

_REGISTRY: dict[str, Callable] = {}


class EncoderError(ValueError):
    """An encoder that cannot be built (unknown name, weights file missing, no network for a download)."""


def register_encoder(name: str):
    """Register a builder `fn(pretrained: bool) -> torch.nn.Module` returning pooled (N, D) features."""

    def wrap(fn):
        _REGISTRY[name] = fn
        return fn

    return wrap


def list_encoders() -> list[str]:
    return sorted(_REGISTRY)


# timm's default pretrained tag for "resnet50" (timm.models.get_pretrained_cfg("resnet50").hf_hub_id)
RESNET50_HF_REPO = "timm/resnet50.a1_in1k"
RESNET50_HF_FILE = "model.safetensors"


@register_encoder("resnet50-trunc")
def _resnet50_trunc(pretrained: bool):
    # CLAM's encoder stops after layer3 (1024 channels): deeper layers are too ImageNet-specific.
    # Plain torch: no timm/torchvision import on the encoder actor's start-up path.
    from gigamamba.features.resnet import resnet50_trunc

    model = resnet50_trunc()
    if pretrained:
        from huggingface_hub import hf_hub_download
        from safetensors.torch import load_file

        path = hf_hub_download(RESNET50_HF_REPO, RESNET50_HF_FILE)  # network errors: create_encoder words them
        missing, _ = model.load_state_dict(load_file(path), strict=False)  # layer4.*, fc.* are unexpected
        if missing:
            raise EncoderError(f"encoder resnet50-trunc: {RESNET50_HF_REPO}/{RESNET50_HF_FILE} lacks "
                               f"{len(missing)} parameters (first: {missing[0]})")
    return model


def _timm_model(name: str, pretrained: bool):
    import timm

    if not timm.is_model(name):
        raise EncoderError(f"unknown encoder {name!r}: not registered ({', '.join(list_encoders())}) "
                           "and not a timm model name")
    return timm.create_model(name, pretrained=pretrained, num_classes=0)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _load_state(path: Path) -> dict:
    import torch

    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return {k.removeprefix("module.").removeprefix("model."): v for k, v in state.items()}


class Encoder:
    """A tile encoder plus what the store records about it (name, dim, weights, input_px, mean, std)."""

    # How a CUDA batch's host thread waits for the GPU (one of GPU_WAITS; settable per instance, e.g. by the ingest
    # actor). "block": the tiles go up from, and the features come back to, pinned buffers with asynchronous
    # copies, and the thread sleeps on a blocking CUDA event until they are back. "spin": torch's plain
    # synchronous copies, whose thread busy-waits (a full core) for as long as the GPU computes the batch and
    # any batch queued before it. With the GPU saturated, "block" ran 15% faster (H100 and H200); in the ingest
    # pipeline at ~3,000 tiles/s, where the GPU is busy a quarter of the time, neither freed measurable CPU for
    # the decoding tasks (README, bench ingest, session 13).
    gpu_wait = "block"

    def __init__(self, name: str, model, weights: str, input_px: int, mean, std, device: str = "cpu",
                 weights_sha256: str | None = None):
        import torch

        self.name, self.weights, self.input_px = name, weights, int(input_px)
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.weights_sha256 = weights_sha256
        self.device = torch.device(device)
        self.model = model.eval().to(self.device)
        if self.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            self.amp_dtype = None
        self._mean_t = torch.tensor(self.mean, device=self.device).view(1, 3, 1, 1) * 255
        self._std_t = torch.tensor(self.std, device=self.device).view(1, 3, 1, 1) * 255
        with torch.inference_mode():
            probe = self.model(torch.zeros(1, 3, self.input_px, self.input_px, device=self.device))
        self.dim = int(probe.reshape(1, -1).shape[1])

    def info(self) -> dict:
        """Encoder attrs for the store: name, dim, weights, input_px, mean, std (and weights_sha256)."""
        out = {"name": self.name, "dim": self.dim, "weights": self.weights, "input_px": self.input_px,
               "mean": list(self.mean), "std": list(self.std)}
        if self.weights_sha256:
            out["weights_sha256"] = self.weights_sha256
        return out

    def embed(self, tiles: np.ndarray) -> np.ndarray:
        """tiles uint8 (N, H, W, 3), already at input_px -> features float32 (N, dim)."""
        import torch

        blocking = self.device.type == "cuda" and self.gpu_wait == "block"
        if self.gpu_wait not in GPU_WAITS:
            raise ValueError(f"encoder gpu_wait must be one of {GPU_WAITS}, got {self.gpu_wait!r}")
        x = torch.from_numpy(np.ascontiguousarray(tiles))
        if blocking:
            # A copy from pageable memory goes through the driver's staging buffer, and the thread waits (busy)
            # for the stream's earlier work before its last part goes up. A pinned buffer from torch's caching
            # host allocator (reused only once its copy is done) makes the upload truly asynchronous.
            staged = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
            staged.copy_(x)
            x = staged
        x = x.to(self.device, non_blocking=True)
        x = x.permute(0, 3, 1, 2).float()
        if x.shape[-1] != self.input_px or x.shape[-2] != self.input_px:
            x = torch.nn.functional.interpolate(x, size=(self.input_px, self.input_px), mode="bilinear",
                                                antialias=True, align_corners=False)
        x = (x - self._mean_t) / self._std_t
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=self.amp_dtype,
                                                    enabled=self.amp_dtype is not None):
            out = self.model(x)
        out = out.reshape(out.shape[0], -1).float()
        if not blocking:
            return out.cpu().numpy()
        host = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
        host.copy_(out, non_blocking=True)
        done = torch.cuda.Event(blocking=True)  # synchronize() sleeps instead of polling
        done.record()
        done.synchronize()
        return host.numpy()


def create_encoder(name: str = "resnet50-trunc", weights: str = "imagenet", input_px: int = 224,
                   device: str | None = None) -> Encoder:
    """Build an encoder by registry or timm name; `weights` is "imagenet", "random" or a file path.

    device="meta" builds only the shapes (no weight init, no arithmetic): enough for info() and to check a
    name or a weights file's keys in a fraction of a second. Pretrained weights are still fetched.
    """
    import contextlib

    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    base = _REGISTRY.get(name) or (lambda pretrained: _timm_model(name, pretrained))

    def builder(pretrained: bool):
        with torch.device("meta") if device == "meta" and not pretrained else contextlib.nullcontext():
            return base(pretrained)

    sha = None
    if weights == "random":
        torch.manual_seed(RANDOM_SEED)
        model = builder(False)
    elif weights in ("imagenet", "pretrained"):
        try:
            model = builder(True)
        except EncoderError:
            raise
        except Exception as exc:
            raise EncoderError(f"encoder {name}: could not fetch pretrained weights ({' '.join(str(exc).split())[:200]}); "
                               "pass a local weights file in encoder.weights, or 'random' for a demo") from None
    else:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise EncoderError(f"encoder {name}: weights {weights!r} is neither 'imagenet', 'random' nor an existing file")
        torch.manual_seed(RANDOM_SEED)
        model = builder(False)
        state = _load_state(path)
        # assign on meta: a probe checks the keys without copying into storage-less parameters
        missing, unexpected = model.load_state_dict(state, strict=False, assign=device == "meta")
        if device == "meta":  # assign kept the file's dtype; a CPU/GPU build copies into float32 parameters
            model = model.float()
        if missing:
            raise EncoderError(f"encoder {name}: weights file {path} lacks {len(missing)} parameters "
                               f"(first: {missing[0]}); is it for this architecture?")
        sha = sha256_file(path)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean = cfg.get("mean", IMAGENET_MEAN)
    std = cfg.get("std", IMAGENET_STD)
    if len(mean) != 3:
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    return Encoder(name, model, str(weights), input_px, mean, std, device=device, weights_sha256=sha)
