"""The encoder check embed_cohort runs beside Ray's start-up: a child process or a thread, same answers."""

import os
import sys
import time

import pytest

from gigamamba.features.encoders import EncoderError, create_encoder
from gigamamba.features.probe import EncoderProbe, _rebuild_error

ENC = {"name": "resnet50-trunc", "weights": "random", "input_px": 64}


@pytest.mark.parametrize("process", [True, False], ids=["process", "thread"])
def test_probe_gives_the_meta_build_attrs(process):
    probe = EncoderProbe(ENC, process=process)
    assert (probe._proc is not None) == process
    assert probe.info() == create_encoder("resnet50-trunc", "random", 64, device="meta").info()
    assert probe.info()["dim"] == 1024  # a second call answers from the first
    if process:
        assert not os.path.exists(probe._answer)  # the answer file is gone once read


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


def test_errors_are_rebuilt_by_module_and_name():
    assert type(_rebuild_error({"type": "EncoderError", "module": "gigamamba.features.encoders",
                                "message": "m"}, "net")) is EncoderError
    assert type(_rebuild_error({"type": "ValueError", "module": "builtins", "message": "m"}, "net")) is ValueError
    # a class that only shares a builtin's name is not that builtin; KeyError would be quoted twice
    for error in ({"type": "ValueError", "module": "somelib", "message": "m"},
                  {"type": "KeyError", "module": "builtins", "message": "'w'"}):
        rebuilt = _rebuild_error(error, "net")
        assert type(rebuilt) is RuntimeError and "'net'" in str(rebuilt) and error["type"] in str(rebuilt)


def test_a_child_that_dies_before_answering_is_replaced_by_a_check_here(monkeypatch):
    monkeypatch.setattr(sys, "executable", "/bin/false")  # exits 1 at once, answers nothing
    probe = EncoderProbe(ENC, process=True)
    assert probe._proc is not None and probe.info()["dim"] == 1024
    with pytest.raises(EncoderError, match="no-such-net"):  # the check's own error, not "the child died"
        EncoderProbe({**ENC, "name": "no-such-net"}, process=True).info()


def test_no_usable_interpreter_means_a_thread(monkeypatch):
    monkeypatch.setattr(sys, "executable", "")  # an embedded Python: Popen raises
    probe = EncoderProbe(ENC, process=True)
    assert probe._proc is None and probe.info()["dim"] == 1024


def test_the_child_checks_before_info_is_called():
    """The check runs beside the caller, not when it waits: the child is done before anyone asks."""
    probe = EncoderProbe(ENC, process=True)
    deadline = time.monotonic() + 300  # generous: torch's import on a loaded 2-core machine
    while probe._proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert probe._proc.poll() == 0  # done and exited without anyone reading its answer yet
    assert os.path.getsize(probe._answer) > 0
    assert probe.info()["dim"] == 1024
