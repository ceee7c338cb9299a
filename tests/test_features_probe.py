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
        assert probe._proc.returncode == 0  # the child's answer, not a check here after it died
        assert not os.path.exists(os.path.dirname(probe._answer))  # its folder is gone once read


@pytest.mark.parametrize("process", [True, False], ids=["process", "thread"])
def test_probe_raises_the_builders_error_in_the_caller(process, tmp_path):
    def check(enc, error, match, wait="info"):
        probe = EncoderProbe(enc, process=process)
        with pytest.raises(error, match=match):
            getattr(probe, wait)()
        if process:
            assert probe._proc.returncode == 0  # the child's answer, not a check here after it died

    check({**ENC, "name": "no-such-net"}, EncoderError, "no-such-net")
    # a Path, as a spec made in Python may have it, goes to the child as str
    check({**ENC, "weights": tmp_path / "missing.pt"}, EncoderError, "missing.pt")
    # an error that is not ours keeps its builtin type across the process boundary
    check({**ENC, "input_px": "abc"}, ValueError, "abc", wait="raise_error")


def test_errors_are_rebuilt_by_module_and_name():
    assert type(_rebuild_error({"type": "EncoderError", "module": "gigamamba.features.encoders",
                                "message": "m"}, "net")) is EncoderError
    assert type(_rebuild_error({"type": "ValueError", "module": "builtins", "message": "m"}, "net")) is ValueError
    # a class that only shares a builtin's name is not that builtin; KeyError would be quoted twice
    for error in ({"type": "ValueError", "module": "somelib", "message": "m"},
                  {"type": "KeyError", "module": "builtins", "message": "'w'"}):
        rebuilt = _rebuild_error(error, "net")
        assert type(rebuilt) is RuntimeError and "'net'" in str(rebuilt) and error["type"] in str(rebuilt)


def test_a_child_that_dies_before_answering_is_replaced_by_a_check_here(monkeypatch, tmp_path):
    dies = tmp_path / "dies"
    dies.write_text("#!/bin/sh\nexit 1\n")  # exits at once, answers nothing (no /bin/false on macOS)
    dies.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(dies))
    probe = EncoderProbe(ENC, process=True)
    assert probe._proc is not None and probe.info()["dim"] == 1024
    with pytest.raises(EncoderError, match="no-such-net"):  # the check's own error, not "the child died"
        EncoderProbe({**ENC, "name": "no-such-net"}, process=True).info()


def test_no_usable_interpreter_means_a_thread(monkeypatch):
    monkeypatch.setattr(sys, "executable", "")  # an embedded Python: Popen raises
    probe = EncoderProbe(ENC, process=True)
    assert probe._proc is None and probe.info()["dim"] == 1024


def test_the_child_checks_before_info_is_called(monkeypatch, tmp_path):
    """The check runs beside the caller, not when it waits: the child is done before anyone asks."""
    # the child has this process's sys.path, not the working directory ahead of it (a torch source tree)
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text("raise ImportError('the working directory')\n")
    monkeypatch.chdir(tmp_path)
    probe = EncoderProbe(ENC, process=True)
    deadline = time.monotonic() + 300  # generous: torch's import on a loaded 2-core machine
    while probe._proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert probe._proc.poll() == 0  # done and exited without anyone reading its answer yet
    assert os.path.getsize(probe._answer) > 0
    assert probe.info()["dim"] == 1024
