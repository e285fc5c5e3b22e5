"""The simulated microscope in a process of its own, as a real microscope is a machine of its own.

Why: in one Python process the simulator's render and send threads, the receiver's threads and the
analysis share one interpreter lock and two cores. Measured in the 256 x 256, 2 ms demo with the
microscope in the demo's process: 111-143 % CPU for the whole process, and the scan took 224-245 s
for 131 s of acquisition while the analysis itself was busy for 103-119 s of it. The live analysis
is what streamclust ships; the simulator only stands in for hardware, so it should not compete with
the analysis for the interpreter.

:class:`MicroscopeProcess` starts ``python -m streamclust.simulators.microscope_process SPEC`` with
the phantom's and the microscope's settings as JSON, reads one line with the endpoints once both
detectors listen (an explicit handshake, no sleeping), and stops the child when the block ends. The
child builds exactly what :class:`~streamclust.simulators.microscope.SimulatedMicroscope` builds in
process, from the same settings, so the two are interchangeable (``streamclust demo --simulator``).
Usage (the ports are free ones, chosen by the child; ``tests/test_microscope_process.py`` runs it)::

    with MicroscopeProcess({"scan_shape": [4, 4], "seed": 1}, {"dwell_s": 0.0}) as scope:
        acquire_scan(scope.data_address, scope.eds_endpoint, 16, on_batch)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import select
import subprocess
import sys
import tempfile

logger = logging.getLogger(__name__)

__all__ = ["MicroscopeProcess"]


class MicroscopeProcess:
    """A :class:`~streamclust.simulators.microscope.SimulatedMicroscope` in a child process.

    Parameters
    ----------
    phantom : dict
        :class:`~streamclust.simulators.phantom.LamellaPhantom` keyword arguments (JSON-able).
    microscope : dict, optional
        :class:`~streamclust.simulators.microscope.MicroscopeConfig` fields (JSON-able); ports
        default to 0 (free ports) here.
    start_timeout : float
        Seconds the child may take to build the phantom, compile its kernels and listen.

    Attributes
    ----------
    data_address, control_address : (host, port)
        The Merlin data and control ports.
    eds_endpoint : str
        The EDS publisher's ZeroMQ endpoint.
    """

    def __init__(self, phantom: dict, microscope: dict | None = None, *, start_timeout: float = 300.0):
        self.phantom = dict(phantom)
        self.microscope = {"data_port": 0, "control_port": 0, "eds_port": 0, **(microscope or {})}
        self.start_timeout = float(start_timeout)
        self._proc: subprocess.Popen | None = None
        self._err = None

    def start(self) -> MicroscopeProcess:
        spec = json.dumps({"phantom": self.phantom, "microscope": self.microscope})
        # stderr to a file: a chatty child must not block on a full pipe nobody reads
        self._err = tempfile.TemporaryFile(mode="w+")
        self._proc = subprocess.Popen([sys.executable, "-m", __name__, spec], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=self._err, text=True)
        # the endpoints, once both detectors listen; a child that hangs instead is not waited for
        # forever (an EOF, a child that died, also makes the pipe readable)
        readable, _, _ = select.select([self._proc.stdout], [], [], self.start_timeout)
        if not readable:
            self._proc.kill()
            self.stop()
            raise RuntimeError(f"the simulated microscope's process did not listen within {self.start_timeout:.0f} s")
        line = self._proc.stdout.readline()
        if not line:
            self._proc.wait(timeout=self.start_timeout)
            err = self.stderr_text().strip().splitlines()
            # the child's last line is its error (the traceback is logged at debug level)
            logger.debug("simulated microscope's stderr:\n%s", "\n".join(err))
            msg = ("the simulated microscope's process ended before listening: "
                   + (err[-1] if err else f"exit code {self._proc.returncode}"))
            self.stop()
            raise RuntimeError(msg)
        ready = json.loads(line)
        host, port = ready["merlin_data"].rsplit(":", 1)
        self.data_address = (host, int(port))
        host, port = ready["merlin_control"].rsplit(":", 1)
        self.control_address = (host, int(port))
        self.eds_endpoint = ready["eds"]
        logger.info("simulated microscope in process %d: %s", self._proc.pid, ready)
        return self

    def stderr_text(self) -> str:
        if self._err is None:
            return ""
        self._err.seek(0)
        return self._err.read()

    def stop(self, timeout: float = 30.0) -> None:
        """Ask the child to stop (a line on its stdin), then wait; kill it if it does not."""
        proc = self._proc
        if proc is None:
            return
        try:
            if proc.poll() is None:
                try:
                    proc.stdin.write("stop\n")
                    proc.stdin.flush()
                except (BrokenPipeError, OSError):
                    pass
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    logger.warning("simulated microscope process %d did not stop in %.0f s: killed", proc.pid, timeout)
                    proc.kill()
                    proc.wait(timeout=timeout)
            if proc.returncode not in (0, None):
                logger.warning("simulated microscope process exited with %s: %s", proc.returncode,
                               self.stderr_text()[-2000:])
        finally:
            for stream in (proc.stdin, proc.stdout, self._err):
                if stream is not None:
                    stream.close()
            self._proc = None

    def __enter__(self) -> MicroscopeProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _serve(spec: dict) -> None:
    """The child: build the microscope, print its endpoints, serve until asked to stop."""
    from streamclust.simulators.microscope import MicroscopeConfig, SimulatedMicroscope
    from streamclust.simulators.phantom import LamellaPhantom

    phantom = LamellaPhantom(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec["phantom"].items()})
    names = {f.name for f in dataclasses.fields(MicroscopeConfig)}
    config = MicroscopeConfig(**{k: v for k, v in spec["microscope"].items() if k in names})
    with SimulatedMicroscope(phantom, config) as scope:
        print(json.dumps(scope.endpoints), flush=True)
        sys.stdin.readline()  # the parent's "stop", or EOF when the parent is gone


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    _serve(json.loads(sys.argv[1]))
