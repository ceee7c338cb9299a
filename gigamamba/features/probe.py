"""Check an encoder spec on the meta device while the caller goes on: `EncoderProbe(enc).info()`.

`embed_cohort` checks the encoder (name, weights) before it writes anything, and wants the check to overlap
Ray's start-up rather than precede it. The check imports torch (~4 s on a 16-core H100 node). Done in a
thread of the driver, that import held the GIL and Python's import locks while the driver imported Ray
Data and Zarr, opened the store and built the dataset: on this 2-core machine `import pandas, ray.data`
went from 1.5 s to 4.7 s beside it, and on the H100 node ray_ready -> dataset_built took 6.3 s. So when
torch is not imported yet, the probe runs in a child process (same interpreter and sys.path), which
costs a core for a few seconds but no time on the driver's path. When torch is already imported (a
second run in the same process, the tests) a thread is cheaper and takes no import locks of note.
"""

from __future__ import annotations

import builtins
import json
import os
import subprocess
import sys
import threading
import weakref

_MARK = "GIGAMAMBA-PROBE "  # the result line, told apart from anything a library prints


def _probe(enc: dict) -> dict:
    from gigamamba.features.encoders import create_encoder

    return create_encoder(enc["name"], enc["weights"], int(enc["input_px"]), device="meta").info()


def _rebuild_error(kind: str, message: str) -> BaseException:
    """The child's exception as the same type where that type is ours or a builtin, else a RuntimeError."""
    from gigamamba.features.encoders import EncoderError

    if kind == "EncoderError":
        return EncoderError(message)
    cls = getattr(builtins, kind, None)
    if isinstance(cls, type) and issubclass(cls, Exception):
        try:
            return cls(message)
        except TypeError:  # an exception type whose constructor wants other arguments
            pass
    return RuntimeError(f"encoder check failed: {kind}: {message}")


def _reap(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()


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
            env = dict(os.environ)
            # the child sees this interpreter's sys.path, as multiprocessing's spawn would give it
            env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
            self._proc = subprocess.Popen([sys.executable, "-m", "gigamamba.features.probe"], env=env,
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True)
            weakref.finalize(self, _reap, self._proc)  # never leave the child behind if info() is not called
            # The spec goes in now, not in info(): the child reads it before it imports anything heavy, so
            # written only when info() waits, the whole check would run then, after Ray's start-up instead
            # of beside it. A few hundred bytes: the pipe takes them without blocking.
            try:
                self._proc.stdin.write(json.dumps(self._enc))
                self._proc.stdin.close()
            except OSError:  # the child is already gone: info() reports it
                pass
        else:
            self._thread = threading.Thread(target=self._run_thread, name="encoder-probe", daemon=True)
            self._thread.start()

    def _run_thread(self) -> None:
        try:
            self._info = _probe(self._enc)
        except BaseException as exc:  # re-raised in the caller's thread by info()
            self._error = exc

    def _wait_process(self) -> None:
        self._proc.stdin = None  # written and closed at construction
        out, err = self._proc.communicate()
        lines = [ln[len(_MARK):] for ln in out.splitlines() if ln.startswith(_MARK)]
        if not lines:
            tail = " ".join(err.strip().splitlines()[-3:]) or f"exit status {self._proc.returncode}"
            self._error = RuntimeError(f"encoder check of {self._enc['name']!r} died before answering: {tail}")
            return
        result = json.loads(lines[-1])
        if "error" in result:
            self._error = _rebuild_error(result["error"]["type"], result["error"]["message"])
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


def main() -> int:
    enc = json.loads(sys.stdin.read())
    try:
        result = {"info": _probe(enc)}
    except Exception as exc:
        result = {"error": {"type": type(exc).__name__, "message": str(exc)}}
    print(_MARK + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
