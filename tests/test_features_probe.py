"""The encoder check embed_cohort runs beside Ray's start-up: a child process or a thread, same answers."""

import pytest

from gigamamba.features.encoders import EncoderError, create_encoder
from gigamamba.features.probe import EncoderProbe

ENC = {"name": "resnet50-trunc", "weights": "random", "input_px": 64}


@pytest.mark.parametrize("process", [True, False], ids=["process", "thread"])
def test_probe_gives_the_meta_build_attrs(process):
    probe = EncoderProbe(ENC, process=process)
    assert (probe._proc is not None) == process
    assert probe.info() == create_encoder("resnet50-trunc", "random", 64, device="meta").info()
    assert probe.info()["dim"] == 1024  # a second call answers from the first


@pytest.mark.parametrize("process", [True, False], ids=["process", "thread"])
def test_probe_raises_the_builders_error_in_the_caller(process, tmp_path):
    with pytest.raises(EncoderError, match="no-such-net"):
        EncoderProbe({**ENC, "name": "no-such-net"}, process=process).info()
    missing = tmp_path / "missing.pt"
    with pytest.raises(EncoderError, match="missing.pt"):
        EncoderProbe({**ENC, "weights": str(missing)}, process=process).info()
    # an error that is not ours keeps its builtin type across the process boundary
    with pytest.raises(ValueError, match="abc"):
        EncoderProbe({**ENC, "input_px": "abc"}, process=process).raise_error()


def test_a_child_that_dies_is_reported_with_the_encoder_name(monkeypatch):
    import sys

    monkeypatch.setattr(sys, "executable", "/bin/false")  # exits 1 at once, prints nothing
    with pytest.raises(RuntimeError, match="resnet50-trunc.*died before answering"):
        EncoderProbe(ENC, process=True).info()


def test_the_child_checks_before_info_is_called():
    """The spec goes to the child at construction: the check runs beside the caller, not when it waits."""
    import time

    probe = EncoderProbe(ENC, process=True)
    deadline = time.monotonic() + 300  # generous: torch's import on a loaded 2-core machine
    while probe._proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert probe._proc.poll() == 0  # done and exited without anyone reading its answer yet
    assert probe.info()["dim"] == 1024
