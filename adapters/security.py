"""Optional ZeroMQ CURVE security for endpoints that leave the machine, and the loopback check.

Every socket streamclust binds defaults to ``127.0.0.1``. When a stream must cross the instrument
network (an EDS PC, a viewer on another machine), CURVE encrypts it and authenticates both ends:

* the **publishing side** (EventPublisher, EDSPublisher, FrameBridge) holds the *server* key pair
  (:class:`CurveServer`); it may restrict clients to an allow-list: a directory of client public
  key files, checked by a :class:`zmq.auth.thread.ThreadAuthenticator` (one per ZeroMQ context,
  started on first use and kept while the process runs, shared by every CURVE server socket of
  that context through a ZAP domain of its own);
* the **receiving side** (EventSubscriber, SpectrumReceiver, ZmqFrameSource) holds a *client* key
  pair and the server's public key (:class:`CurveClient`).

The role follows the data, not the ``bind``/``connect`` direction: a publisher is the CURVE server
whether it binds or connects. Keys are the files ZeroMQ's own tool writes,
:func:`zmq.auth.create_certificates` (``name.key`` public, ``name.key_secret`` both halves);
:func:`create_keys` is a thin wrapper. A client with an unknown key, or a plain-text peer, completes
no handshake and receives nothing; ZeroMQ logs the refusal through the authenticator.

:func:`warn_if_exposed` logs a warning when a socket binds a non-loopback interface without CURVE.

Examples
--------
>>> import tempfile, zmq
>>> d = tempfile.mkdtemp()
>>> server_pub, server_secret = create_keys(d, "server")
>>> client_pub, client_secret = create_keys(d + "/clients", "viewer")
>>> server = CurveServer(server_secret, authorized_clients=d + "/clients")
>>> client = CurveClient(client_secret, server_pub)
>>> ctx = zmq.Context()
>>> push, pull = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
>>> apply_server(push, server, ctx)
>>> apply_client(pull, client)
>>> port = push.bind_to_random_port("tcp://127.0.0.1")
>>> _ = pull.connect(f"tcp://127.0.0.1:{port}")
>>> push.send(b"hello"); pull.poll(5000), pull.recv()
(1, b'hello')
>>> push.close(0); pull.close(0); release_server(server, ctx)
>>> stop_authenticator(ctx); ctx.term()
>>> is_loopback("tcp://127.0.0.1:5555"), is_loopback("tcp://0.0.0.0:5555"), is_loopback("ipc:///tmp/x")
(True, False, True)
"""

from __future__ import annotations

import ipaddress
import logging
import os
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

logger = logging.getLogger(__name__)

__all__ = [
    "CurveServer",
    "CurveClient",
    "create_keys",
    "apply_server",
    "apply_client",
    "release_server",
    "registered_domains",
    "stop_authenticator",
    "apply_security",
    "is_loopback",
    "warn_if_exposed",
]


def _load(path: str | os.PathLike, *, need_secret: bool) -> tuple[bytes, bytes | None]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CURVE key file {str(path)!r} does not exist")
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (ValueError, OSError) as exc:
        raise ValueError(f"{str(path)!r} is not a ZeroMQ certificate file: {exc}") from exc
    if need_secret and not secret:
        raise ValueError(f"{str(path)!r} holds no secret key (use the '.key_secret' file)")
    return public, secret


def create_keys(directory: str | os.PathLike, name: str) -> tuple[str, str]:
    """Make a key pair with :func:`zmq.auth.create_certificates`; returns (public file, secret file).

    The directory is created (mode 0700) if needed; the secret file is made readable by its owner only.
    """
    directory = Path(directory)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    public, secret = zmq.auth.create_certificates(directory, name)
    os.chmod(secret, 0o600)
    return str(public), str(secret)


@dataclass(frozen=True)
class CurveServer:
    """The publishing side's CURVE settings.

    Parameters
    ----------
    secret_key_file : path
        The server's ``.key_secret`` file (holds both halves of its key pair).
    authorized_clients : path or None
        Directory of client public key files (``*.key``) allowed to connect; read when the socket
        is set up. None accepts any client that knows the server's public key (encryption, but no
        client authentication).
    """

    secret_key_file: str | os.PathLike
    authorized_clients: str | os.PathLike | None = None
    _domain: str = field(default_factory=lambda: "streamclust-" + uuid.uuid4().hex[:12], init=False,
                         repr=False, compare=False)

    def __post_init__(self) -> None:
        _load(self.secret_key_file, need_secret=True)  # fail at configuration time, not at bind
        if self.authorized_clients is not None and not Path(self.authorized_clients).is_dir():
            raise FileNotFoundError(f"authorized_clients {str(self.authorized_clients)!r} is not a directory")


@dataclass(frozen=True)
class CurveClient:
    """The receiving side's CURVE settings.

    Parameters
    ----------
    secret_key_file : path
        The client's ``.key_secret`` file.
    server_public_key_file : path
        The server's public ``.key`` file (its secret file works too; only the public half is read).
    """

    secret_key_file: str | os.PathLike
    server_public_key_file: str | os.PathLike

    def __post_init__(self) -> None:
        _load(self.secret_key_file, need_secret=True)
        _load(self.server_public_key_file, need_secret=False)


class _Authenticator(ThreadAuthenticator):
    """A ThreadAuthenticator whose "allow any client" is per ZAP domain.

    pyzmq's ``configure_curve(location=CURVE_ALLOW_ANY)`` sets one flag for the whole authenticator:
    an allow-any socket would open every other socket's allow-list (and the next allow-list socket
    would close the allow-any one). Here allow-any is kept per domain.
    """

    def __init__(self, context: zmq.Context):
        super().__init__(context, log=logging.getLogger(__name__ + ".zap"))
        self.allow_any_domains: set[str] = set()

    async def _authenticate_curve(self, domain: str, client_key: bytes) -> tuple[bool, bytes]:
        if domain in self.allow_any_domains:
            return True, b"OK"
        return await super()._authenticate_curve(domain, client_key)


# One authenticator per context (a context has one ZAP endpoint, inproc://zeromq.zap.01), started on
# first use and kept for the context's life: stopping it and starting another at once races with
# libzmq releasing the inproc endpoint ("Address already in use"). Each CURVE server socket has a
# ZAP domain of its own, registered while the socket lives, so allow-lists stay apart.
_auth_lock = threading.Lock()
_authenticators: dict[int, _Authenticator] = {}  # id(context) -> authenticator


def _authenticator(context: zmq.Context) -> _Authenticator:
    auth = _authenticators.get(id(context))
    if auth is None:
        auth = _authenticators[id(context)] = _Authenticator(context)
        auth.start()
    return auth


def stop_authenticator(context: zmq.Context) -> None:
    """Stop the context's authenticator, if any: needed before ``context.term()`` of a private
    context (the authenticator's sockets would keep ``term`` waiting)."""
    with _auth_lock:
        auth = _authenticators.pop(id(context), None)
    if auth is not None:
        auth.stop()


def registered_domains() -> set[str]:
    """ZAP domains of the CURVE server sockets currently set up (for checks and diagnostics)."""
    with _auth_lock:
        return {d for auth in _authenticators.values() for d in (*auth.certs, *auth.allow_any_domains)}


def apply_server(sock: zmq.Socket, security: CurveServer, context: zmq.Context) -> None:
    """Make ``sock`` a CURVE server; call before ``bind``/``connect``.

    The context's authenticator is started (or shared) and told this socket's allow-list (or that
    any client holding the server key is welcome). Pair every call with :func:`release_server`.
    """
    public, secret = _load(security.secret_key_file, need_secret=True)
    with _auth_lock:
        auth = _authenticator(context)
        if security.authorized_clients is None:
            auth.allow_any_domains.add(security._domain)
        else:
            allowed = zmq.auth.load_certificates(str(security.authorized_clients))
            if not allowed:
                logger.warning("no client public keys (*.key) in %s: every client will be refused",
                               security.authorized_clients)
            auth.certs[security._domain] = allowed
    sock.zap_domain = security._domain.encode()
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_server = True


def release_server(security: CurveServer | None, context: zmq.Context) -> None:
    """Forget the socket's ZAP domain (its allow-list) once the socket is closed."""
    if not isinstance(security, CurveServer):
        return
    with _auth_lock:
        auth = _authenticators.get(id(context))
        if auth is not None:
            auth.certs.pop(security._domain, None)
            auth.allow_any_domains.discard(security._domain)


def apply_client(sock: zmq.Socket, security: CurveClient) -> None:
    """Make ``sock`` a CURVE client of the server whose public key ``security`` names."""
    public, secret = _load(security.secret_key_file, need_secret=True)
    server_public, _ = _load(security.server_public_key_file, need_secret=False)
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_serverkey = server_public


def apply_security(sock: zmq.Socket, security, context: zmq.Context, *, role: str) -> None:
    """Apply ``security`` (None, :class:`CurveServer` or :class:`CurveClient`) for a socket in ``role``
    (``"server"``: publishing side, ``"client"``: receiving side); a mismatched type is an error."""
    if security is None:
        return
    if role == "server":
        if not isinstance(security, CurveServer):
            raise TypeError(f"a publishing socket needs a CurveServer, got {type(security).__name__}")
        apply_server(sock, security, context)
    elif role == "client":
        if not isinstance(security, CurveClient):
            raise TypeError(f"a receiving socket needs a CurveClient, got {type(security).__name__}")
        apply_client(sock, security)
    else:
        raise ValueError(f"role must be 'server' or 'client', got {role!r}")


def _host_of(endpoint: str) -> str | None:
    """The host part of a ``tcp://host:port`` endpoint; None for ipc/inproc (never on the network)."""
    transport, sep, rest = endpoint.partition("://")
    if not sep:
        raise ValueError(f"{endpoint!r} is not a ZeroMQ endpoint (transport://address)")
    if transport not in ("tcp", "ws", "wss", "udp", "pgm", "epgm"):
        return None
    if ";" in rest:  # "source;destination" form: the destination is what is bound
        rest = rest.split(";", 1)[1]
    host = rest.rsplit(":", 1)[0]
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def is_loopback(endpoint_or_host: str) -> bool:
    """True when an endpoint (``tcp://host:port``) or a bare host only reaches this machine."""
    host = _host_of(endpoint_or_host) if "://" in endpoint_or_host else endpoint_or_host
    if host is None:
        return True
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # an interface name or a hostname: may well face the network


def warn_if_exposed(endpoint: str, security, what: str) -> bool:
    """Log a warning when ``endpoint`` is reachable from the network and ``security`` is None.

    Returns True when a warning was logged.
    """
    if security is not None or is_loopback(endpoint):
        return False
    logger.warning("%s binds %s, reachable from the network, without CURVE: anyone on the network "
                   "can connect to it; pass security= (docs/security.md)", what, endpoint)
    return True
