"""The whole simulated microscope: a lamella phantom, a Merlin detector and an EDS detector on one scan clock.

Other programs (and the ``streamclust simulate`` command) connect to it exactly as they would to a
real instrument: the Merlin data and control ports speak the real TCP protocol, and the EDS spectra
arrive on a ZeroMQ endpoint in streamclust's documented wire format (docs/wire-formats.md). Both
detectors follow one :class:`~streamclust.simulators.clock.ScanClock`, so frame ``sequence`` and
spectrum ``position = sequence - 1`` describe the same scan position and the same dwell.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from streamclust.simulators.clock import ScanClock

logger = logging.getLogger(__name__)

__all__ = ["MicroscopeConfig", "SimulatedMicroscope"]


@dataclass
class MicroscopeConfig:
    """Settings of the simulated microscope.

    Ports 0 pick free ports (tests); the defaults are the Merlin's real 6341/6342 and 6343 for EDS.
    ``dwell_s = 0`` runs the scan as fast as the machine goes; ``None`` uses the phantom's dwell.
    """

    host: str = "127.0.0.1"
    data_port: int = 6342
    control_port: int = 6341
    eds_port: int = 6343
    eds_socket_type: str = "push"
    dwell_s: float | None = 0.0
    counter_depth: int = 12
    raw: bool = False
    headless: bool = True
    merlin_faults: tuple = ()
    eds_faults: dict = field(default_factory=dict)
    #: sensor layout; None: the source's ``layout`` (a recording's), else "2x2"
    layout: str | None = None


class SimulatedMicroscope:
    """Phantom + Merlin TCP server + EDS publisher sharing one scan clock.

    Parameters
    ----------
    phantom : LamellaPhantom
        The sample. Anything with the phantom's ``frame_into``/``spectrum`` interface works.
    config : MicroscopeConfig, optional
    """

    def __init__(self, phantom, config: MicroscopeConfig | None = None):
        self.phantom = phantom
        self.config = config or MicroscopeConfig()
        self.clock = ScanClock()
        self._merlin = None
        self._eds = None

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> "SimulatedMicroscope":
        from streamclust.simulators.eds import EDSPublisher
        from streamclust.simulators.merlin import MerlinServer

        cfg = self.config
        dwell = self.phantom.dwell_s if cfg.dwell_s is None else cfg.dwell_s
        # Compile the phantom's kernels before anything is served: a cold Numba cache (a fresh
        # clone) stalled the first frames for seconds while the spectra ran on, and the joiner
        # gave 1,598 of 4,096 spectra up as unpaired (a real detector does not pause to compile)
        # a source without spectra (a recording without its EDS file) is served as frames alone
        has_eds = getattr(self.phantom, "has_eds", True)
        for warm in ("frame", "spectrum", "frames", "spectra"):  # every path the servers use
            fn = getattr(self.phantom, warm, None)
            if fn is not None and (has_eds or warm not in ("spectrum", "spectra")):
                fn(0) if warm in ("frame", "spectrum") else fn([0])
        if has_eds:
            self._eds = EDSPublisher(
                self.phantom,
                endpoint=f"tcp://{cfg.host}:{cfg.eds_port}",
                clock=self.clock,
                socket_type=cfg.eds_socket_type,
                **cfg.eds_faults,
            )
            self._eds.start()
        self._merlin = MerlinServer(
            self.phantom,
            host=cfg.host,
            data_port=cfg.data_port,
            control_port=cfg.control_port,
            clock=self.clock,
            counter_depth=cfg.counter_depth,
            raw=cfg.raw,
            layout=cfg.layout or getattr(self.phantom, "layout", "2x2"),
            dwell_s=dwell,
            headless=cfg.headless,
            faults=cfg.merlin_faults,
        )
        self._merlin.start()
        self._merlin.wait_for_listen()
        if self._eds is not None:
            self._eds.wait_for_listen()
        logger.info("simulated microscope up: %s", self.endpoints)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        for part in (self._merlin, self._eds):
            if part is not None:
                part.stop(timeout=timeout)

    def __enter__(self) -> "SimulatedMicroscope":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- what clients need ------------------------------------------------------------------
    @property
    def merlin(self):
        return self._merlin

    @property
    def eds(self):
        return self._eds

    @property
    def endpoints(self) -> dict:
        """Where to connect: Merlin data/control (host, port) and the EDS ZeroMQ endpoint."""
        if self._merlin is None:
            raise RuntimeError("the microscope is not started")
        (dh, dp), (ch, cp) = self._merlin.data_address, self._merlin.control_address
        return {
            "merlin_data": f"{dh}:{dp}",
            "merlin_control": f"{ch}:{cp}",
            "eds": self._eds.endpoint if self._eds is not None else None,
            "eds_socket_type": self.config.eds_socket_type,
            "scan_shape": list(self.phantom.scan_shape),
            "frame_shape": list(self.phantom.frame_shape),
            "n_channels": int(self.phantom.n_channels) if self._eds is not None else 0,
        }
