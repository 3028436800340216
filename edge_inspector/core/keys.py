"""Optional ZeroMQ CURVE on the result stream and the control socket: key files, server and client setup.

Without CURVE (the default), anyone who can reach `publish.endpoint` receives every result, every heatmap
and, with `heatmap: jpeg_overlay`, every frame, and anyone who can reach `publish.control_endpoint` can
change the threshold. CURVE encrypts both sockets and authenticates clients by their public key:

* `edge-inspector keys DIR NAME` writes `DIR/NAME.key` (public, give it out) and `DIR/NAME.key_secret`
  (secret, mode 0600), in ZeroMQ's certificate format, for the service and for each client.
* The service's config names its secret key and, per socket, a folder of client public keys allowed in
  (`security.result_clients`, `security.control_clients`). Results may be left open to any client that
  holds the service's public key (encrypted, not authorised); the control socket always needs an
  authorised key, since it changes verdicts.
* Clients (`subscribe`, `control`, `Subscriber`, `send_control`) take the service's public key and their
  own secret key.

Keys are read once at start: adding or removing a client key takes a restart, so the set of clients
allowed in is the one the service logged when it started.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import click
import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from edge_inspector.core.errors import ConfigError

log = logging.getLogger(__name__)

RESULTS_DOMAIN = "results"
CONTROL_DOMAIN = "control"


def curve_available() -> bool:
    return bool(zmq.has("curve"))


def _require_curve(what: str) -> None:
    if not curve_available():
        raise ConfigError(f"{what}: this libzmq was built without CURVE support")


def generate_keypair(folder: str | Path, name: str) -> tuple[Path, Path]:
    """Write NAME.key (public) and NAME.key_secret (secret, 0600) into folder; never overwrite."""
    _require_curve("keys")
    folder = Path(folder)
    if not name or "/" in name or name.startswith("."):
        raise ConfigError(f"keys: name {name!r} must be a plain file name (e.g. line1 or hmi)")
    public, secret = folder / f"{name}.key", folder / f"{name}.key_secret"
    for path in (public, secret):
        if path.exists():
            raise ConfigError(f"{path}: exists; refusing to overwrite a key (delete it first to replace it)")
    folder.mkdir(parents=True, exist_ok=True)
    old_umask = os.umask(0o077)  # the secret file is never readable by others, not even for an instant
    try:
        public_file, secret_file = zmq.auth.create_certificates(str(folder), name)
    finally:
        os.umask(old_umask)
    Path(public_file).chmod(0o644)
    return Path(public_file), Path(secret_file)


def load_public_key(path: str | Path, what: str) -> bytes:
    public, _ = _load(path, what)
    return public


def load_secret_key(path: str | Path, what: str) -> tuple[bytes, bytes]:
    public, secret = _load(path, what)
    if not secret:
        raise ConfigError(f"{what}: {path} holds no secret key (expected the NAME.key_secret file)")
    return public, secret


def _load(path: str | Path, what: str) -> tuple[bytes, bytes | None]:
    _require_curve(what)
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what}: {path}: key file not found")
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as err:
        raise ConfigError(f"{what}: {path}: not a readable ZeroMQ key file ({err})") from None
    if not public or len(public) != 40:
        raise ConfigError(f"{what}: {path}: no public key in it (expected a file from `edge-inspector keys`)")
    return public, secret


def load_client_keys(folder: str | Path, what: str) -> set[bytes]:
    """The z85 public keys of every *.key file in folder (the clients allowed in)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"{what}: {folder}: folder of client public keys not found")
    try:
        files = sorted(folder.glob("*.key"))
    except OSError as err:
        raise ConfigError(f"{what}: {folder}: cannot list ({err})") from None
    return {load_public_key(file, what) for file in files}


@dataclass
class ClientKeys:
    """What a client needs: the service's public key and its own key pair (z85 bytes)."""

    server_public: bytes
    public: bytes
    secret: bytes

    @classmethod
    def from_files(cls, server_key: str | Path, client_key: str | Path) -> ClientKeys:
        public, secret = load_secret_key(client_key, "--client-key")
        return cls(load_public_key(server_key, "--server-key"), public, secret)

    def apply(self, socket: zmq.Socket) -> None:
        """Call before connect."""
        socket.curve_serverkey = self.server_public
        socket.curve_publickey = self.public
        socket.curve_secretkey = self.secret


def client_keys_option(server_key: str | None, client_key: str | None) -> ClientKeys | None:
    """For the CLIs: both options or neither."""
    if not server_key and not client_key:
        return None
    if not (server_key and client_key):
        raise ConfigError("--server-key and --client-key go together (the service's NAME.key and your "
                          "NAME.key_secret)")
    return ClientKeys.from_files(server_key, client_key)


class _AllowedKeys:
    """ZAP callback for one domain: None allows any client that completed the CURVE handshake."""

    def __init__(self, keys: set[bytes] | None):
        self.keys = keys

    def callback(self, domain: str, key: bytes) -> bool:
        allowed = self.keys is None or key in self.keys
        if not allowed:
            log.warning("refused a %s connection from an unknown CURVE key %s", domain, key.decode(errors="replace"))
        return allowed


class CurveServer:
    """The service's CURVE setup: its key pair and a ZAP authenticator with one client list per socket."""

    def __init__(self, context: zmq.Context, secret_key_file: str | Path, result_clients: str | Path | None,
                 control_clients: str | Path | None):
        self.public, self.secret = load_secret_key(secret_key_file, "security.curve_secret_key")
        results = load_client_keys(result_clients, "security.result_clients") if result_clients else None
        control = load_client_keys(control_clients, "security.control_clients") if control_clients else set()
        self.authenticator = ThreadAuthenticator(context, log=logging.getLogger(__name__ + ".zap"))
        self.authenticator.start()
        self.authenticator.configure_curve_callback(RESULTS_DOMAIN, _AllowedKeys(results))
        self.authenticator.configure_curve_callback(CONTROL_DOMAIN, _AllowedKeys(control))
        log.info("CURVE on: results for %s, control for %d authorised key(s)",
                 "any client holding the service key" if results is None else f"{len(results)} authorised key(s)",
                 len(control))

    def apply(self, socket: zmq.Socket, domain: str) -> None:
        """Call before bind."""
        socket.zap_domain = domain.encode()
        socket.curve_secretkey = self.secret
        socket.curve_publickey = self.public
        socket.curve_server = True

    def close(self) -> None:
        self.authenticator.stop()


@click.command("keys")
@click.argument("folder", type=click.Path(file_okay=False))
@click.argument("name")
def keys_command(folder: str, name: str) -> None:
    """Create a CURVE key pair FOLDER/NAME.key (public) and FOLDER/NAME.key_secret (secret, 0600)."""
    public, secret = generate_keypair(folder, name)
    click.echo(f"public key: {public}  (give this one out)")
    click.echo(f"secret key: {secret}  (keep it on this machine; mode 0600)")
