"""Check an encoder spec on the meta device while the caller goes on: `EncoderProbe(enc).info()`.

`embed_cohort` checks the encoder (name, weights) before it writes anything, and wants the check to overlap
Ray's start-up rather than precede it. The check imports torch (~4 s on a 16-core H100 node). Done in a
thread of the driver, that import holds the GIL and Python's import locks while the driver imports Ray
Data and Zarr, opens the store and builds the dataset: on the 2-core machine `import pandas, ray.data`
went from 1.5 s to 4.7 s beside it. So when torch is not imported yet (a fresh `gigamamba embed`), the
check runs in a child process of the same interpreter and sys.path, which costs a core for a few seconds
but no time on the driver's path. When torch is already imported (a second run in one process, the
benchmark, the tests) a thread is cheaper and takes no import locks of note.

The child gets the spec on its command line and writes its answer to a file: no pipes, so nothing it or a
library prints can fill a pipe and stall it. If the child cannot start or dies without answering, the check
runs again here, so its own error (or its success) is what the caller sees.
"""

from __future__ import annotations

import builtins
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import weakref

from gigamamba.child import python_module


def _probe(enc: dict) -> dict:
    from gigamamba.features.encoders import create_encoder

    return create_encoder(enc["name"], enc["weights"], int(enc["input_px"]), device="meta").info()


def _rebuild_error(error: dict, name: str) -> BaseException:
    """The child's exception as the same type where that type is ours or a builtin, else a RuntimeError."""
    from gigamamba.features.encoders import EncoderError

    kind, module, message = error["type"], error.get("module"), error["message"]
    if (module, kind) == (EncoderError.__module__, "EncoderError"):
        return EncoderError(message)
    cls = getattr(builtins, kind, None) if module == "builtins" else None
    if isinstance(cls, type) and issubclass(cls, Exception) and not issubclass(cls, KeyError):
        try:  # KeyError is left out: its str() is already quoted, and rebuilt it would be quoted twice
            return cls(message)
        except TypeError:  # an exception type whose constructor wants other arguments
            pass
    return RuntimeError(f"encoder {name!r}: the check failed with {module}.{kind}: {message}")


def _reap(proc: subprocess.Popen, folder: str) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    shutil.rmtree(folder, ignore_errors=True)  # the answer, and its .part if the child was killed writing it


class EncoderProbe:
    """Starts the check at construction; `info()` waits for it and returns its attrs or raises its error.

    process: None picks a child process unless torch is already imported here; True/False force it.
    """

    def __init__(self, enc: dict, process: bool | None = None):
        self._enc = {k: enc[k] for k in ("name", "weights", "input_px")}
        self._info: dict | None = None
        self._error: BaseException | None = None
        self._done = False
        if process is None:
            process = "torch" not in sys.modules
        self._proc: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None
        if process:
            self._proc = self._start_child()
        if self._proc is None:
            self._thread = threading.Thread(target=self._run_thread, name="encoder-probe", daemon=True)
            self._thread.start()

    def _start_child(self) -> subprocess.Popen | None:
        # A Path or a numpy int in a spec made in Python: as str, as the thread's check would take them
        spec = json.dumps(self._enc, default=str)
        folder = None
        try:
            # A private folder: the answer's path is on the child's command line, and a name that others can
            # see in a shared /tmp (the answer's .part) could be planted there first, as a link
            folder = tempfile.mkdtemp(prefix="gigamamba-probe-")
            self._answer = os.path.join(folder, "answer.json")
            argv, env = python_module("gigamamba.features.probe", spec, self._answer)
            proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
        except OSError:  # no usable interpreter (an embedded or frozen Python), no temp folder: a thread checks
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)
            return None
        # never leave the child or its answer behind, even if info() is never called
        self._cleanup = weakref.finalize(self, _reap, proc, folder)
        return proc

    def _run_thread(self) -> None:
        try:
            self._info = _probe(self._enc)
        except BaseException as exc:  # re-raised in the caller's thread by info()
            self._error = exc

    def _wait_process(self) -> None:
        self._proc.wait()
        try:
            with open(self._answer) as f:
                result = json.load(f)
        except (OSError, ValueError):  # the child died before answering: check here, for the real answer
            result = None
        self._cleanup()
        if result is None:
            self._run_thread()
        elif "error" in result:
            self._error = _rebuild_error(result["error"], self._enc["name"])
        else:
            self._info = result["info"]

    def info(self) -> dict:
        self.raise_error()
        return self._info

    def raise_error(self) -> None:
        """Wait for the check; raise its error if it failed."""
        if not self._done:
            if self._proc is not None:
                self._wait_process()
            else:
                self._thread.join()
            self._done = True
        if self._error is not None:
            raise self._error


def main(argv: list[str]) -> int:
    """`python -m gigamamba.features.probe SPEC_JSON ANSWER_PATH`: the check, its answer written to the file."""
    enc, answer = json.loads(argv[0]), argv[1]
    try:
        result = {"info": _probe(enc)}
    except Exception as exc:
        result = {"error": {"type": type(exc).__name__, "module": type(exc).__module__, "message": str(exc)}}
    tmp = answer + ".part"
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.replace(tmp, answer)  # whole or absent: a reader never sees half an answer
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
