"""Signed bundles: Ed25519 signatures made on the workstation, checked on the device before a model runs.

bundle.yaml's digests prove a bundle is intact, not who made it: whoever can write a bundle folder can
recompute them (a copy in /tmp with threshold 1e6 loaded fine). A signature closes that gap. The workstation
holds a private key (`edge-export keygen`), signs each bundle it ships (`edge-export sign BUNDLE --key KEY`,
or `fit --sign-key KEY`), and the device's config names the public keys it trusts
(`security.trusted_keys`). With `security.require_signed_bundles: true` (the production setting) the
service refuses, at start and at every reload, a bundle that is unsigned, signed by a key it does not trust,
or whose signature does not verify, in one line naming the file and the key.

What is signed: the bundle's identity digest (core.bundle.identity_digest), the sha256 of the canonical
metadata with every file's sha256 in it (model.onnx's included) except those under engines/, plus the
sha256 of each engines/ file present when it was signed (TensorRT engines, the mixed-precision graph). The
identity leaves engines out because a device may build and record an engine itself after signing; with
signatures required, such an unsigned engine is never run (core.bundle drops it from the files a backend
may choose, and TensorRT uses or builds one in the service's own state directory). The model id on the wire
is made of the identity digest, so a result names exactly the signed model. The signature lives in
`bundle.sig` beside bundle.yaml (one small JSON object), so signing never changes the bundle it signs.

Why Ed25519 from `cryptography`: the library is maintained by the Python Cryptographic Authority, wraps
OpenSSL, ships manylinux aarch64 wheels for JetPack's CPython 3.10 (cryptography-51.0.1
manylinux2014_aarch64: a 4.9 MB wheel, 16 MB installed plus cffi's 0.9 MB on the x86-64 dev VM), and
Ubuntu 22.04 (JetPack 6) also ships it as python3-cryptography. Ed25519 keys are 32 bytes, signatures 64,
verification well under a millisecond; there are no parameters to get wrong. It is imported only when a
key is made, used or checked, so a service without signing pays nothing at start.
"""

from __future__ import annotations

import base64
import binascii
import datetime as _dt
import hashlib
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_inspector.core.errors import BundleError, ConfigError

SIGNATURE_FILE = "bundle.sig"
MAX_SIGNATURE_BYTES = 4096  # a real bundle.sig is ~400 bytes
SIGNATURE_FORMAT = 1
ALGORITHM = "ed25519"
# Domain separation: a signature over a bundle can never be replayed as a signature over anything else.
CONTEXT = b"edge-inspector bundle identity v1\n"


@dataclass(frozen=True)
class TrustedKey:
    """A public key the device trusts: its id (16 hex of the sha256 of the raw key) and its file."""

    key_id: str
    path: Path
    public: Any  # cryptography's Ed25519PublicKey


@dataclass(frozen=True)
class Signature:
    """A bundle signature that verified: by which trusted key, over which identity digest."""

    key_id: str
    key_path: Path
    identity_sha256: str
    engines: dict[str, str]  # engines/ file -> sha256, as signed


def _crypto():
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError as err:  # pragma: no cover - cryptography is an install requirement
        raise ConfigError(f"signed bundles need the `cryptography` package ({err})") from None
    return serialization, ed25519


def key_id_of(public: Any) -> str:
    serialization, _ = _crypto()
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_keypair(private_path: Path, public_path: Path) -> str:
    """Write a new Ed25519 private key (PEM PKCS#8, mode 0600) and its public key (PEM); returns the key id.
    Never overwrites: replacing a signing key is a decision, not a side effect."""
    serialization, ed25519 = _crypto()
    for path in (private_path, public_path):
        if os.path.lexists(path):
            raise ConfigError(f"{path}: already exists; refusing to overwrite a key (delete it first to replace it)")
    key = ed25519.Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    private_path.parent.mkdir(parents=True, exist_ok=True)
    public_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(private_pem)
    fd = os.open(public_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    with os.fdopen(fd, "wb") as handle:
        handle.write(public_pem)
    return key_id_of(key.public_key())


def _read_key_file(path: Path, what: str) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} not found") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the {what} ({err.strerror or err})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > 16384:
            raise ConfigError(f"{path}: not a {what} (expected a small PEM file)")
        return os.read(fd, 16385)
    finally:
        os.close(fd)


def load_private_key(path: Path) -> Any:
    """The signing key; refused when group or others may read it (as ssh refuses such keys)."""
    serialization, ed25519 = _crypto()
    data = _read_key_file(path, "signing key")
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & 0o077:
        raise ConfigError(f"{path}: signing key is readable by others (mode {mode:o}); chmod 600 it")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise ConfigError(f"{path}: not an unencrypted PEM private key (make one with `edge-export keygen`)") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ConfigError(f"{path}: not an Ed25519 key (make one with `edge-export keygen`)")
    return key


def load_public_key(path: Path, field: str = "security.trusted_keys") -> TrustedKey:
    serialization, ed25519 = _crypto()
    data = _read_key_file(path, "public key")
    try:
        public = serialization.load_pem_public_key(data)
    except (ValueError, TypeError):
        raise ConfigError(f"{path}: {field}: not a PEM public key (the .pub file `edge-export keygen` writes)"
                          ) from None
    if not isinstance(public, ed25519.Ed25519PublicKey):
        raise ConfigError(f"{path}: {field}: not an Ed25519 public key")
    return TrustedKey(key_id_of(public), path, public)


def signed_message(identity_sha256: str, engines: dict[str, str]) -> bytes:
    """The exact bytes signed: the context, the identity digest, the engines' digests (sorted, canonical)."""
    listed = json.dumps(engines, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return CONTEXT + identity_sha256.encode("ascii") + b"\n" + listed.encode("ascii")


def signature_document(private_key: Any, identity_sha256: str, model_id: str = "",
                       engines: dict[str, str] | None = None) -> bytes:
    """bundle.sig's content: which key signed which identity digest (and engines), and the signature."""
    engines = dict(engines or {})
    signature = private_key.sign(signed_message(identity_sha256, engines))
    document = {"format": SIGNATURE_FORMAT, "algorithm": ALGORITHM, "key_id": key_id_of(private_key.public_key()),
                "identity_sha256": identity_sha256, "engines": engines, "model_id": model_id,
                "signed": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "signature": base64.b64encode(signature).decode("ascii")}
    return (json.dumps(document, indent=1) + "\n").encode()


def _parse_signature(data: bytes, where: Path) -> dict[str, Any]:
    try:
        document = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise BundleError(f"{where}: not a bundle signature (expected the JSON `edge-export sign` writes)") from None
    if not isinstance(document, dict) or document.get("format") != SIGNATURE_FORMAT or (
            document.get("algorithm") != ALGORITHM):
        raise BundleError(f"{where}: not a format-{SIGNATURE_FORMAT} {ALGORITHM} bundle signature")
    for key in ("key_id", "identity_sha256", "signature"):
        if not isinstance(document.get(key), str) or not document[key]:
            raise BundleError(f"{where}: {key} missing (not a bundle signature)")
    engines = document.get("engines", {})
    if not isinstance(engines, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in engines.items()):
        raise BundleError(f"{where}: engines: expected a mapping of file to sha256 (not a bundle signature)")
    return document


class TrustPolicy:
    """Which keys a device trusts, and whether a bundle must be signed by one of them.

    keys: the trusted public keys; required: refuse unsigned bundles (security.require_signed_bundles).
    A signature that is present is always checked, required or not: a bundle that claims a signer and fails
    the check is refused, never run as if unsigned.
    """

    def __init__(self, keys: list[TrustedKey], required: bool):
        self.keys = {key.key_id: key for key in keys}
        self.required = required

    def describe(self) -> str:
        files = ", ".join(f"{k.path.name} ({k.key_id})" for k in self.keys.values()) or "none"
        return f"signed bundles {'required' if self.required else 'checked when signed'}; trusted keys: {files}"

    def check(self, data: bytes | None, identity_sha256: str, where: Path) -> Signature | None:
        """The verified signature, None for an unsigned bundle when allowed; BundleError otherwise."""
        if data is None:
            if self.required:
                raise BundleError(f"{where}: missing: the bundle is unsigned and security.require_signed_bundles "
                                  f"is on (sign it on the workstation: edge-export sign BUNDLE --key KEY)")
            return None
        document = _parse_signature(data, where)
        key = self.keys.get(document["key_id"])
        if key is None:
            known = ", ".join(self.keys) or "none"
            raise BundleError(f"{where}: signed by key {document['key_id'][:16]!r}, which is not one of "
                              f"security.trusted_keys ({known}; refused)")
        if document["identity_sha256"] != identity_sha256:
            raise BundleError(f"{where}: signs another bundle identity ({document['identity_sha256'][:12]}... vs "
                              f"{identity_sha256[:12]}...: metadata or model changed after signing; refused)")
        from cryptography.exceptions import InvalidSignature

        engines: dict[str, str] = dict(document.get("engines", {}))
        try:
            raw = base64.b64decode(document["signature"], validate=True)
            key.public.verify(raw, signed_message(identity_sha256, engines))
        except (binascii.Error, ValueError, InvalidSignature):
            raise BundleError(f"{where}: signature does not verify with trusted key {key.key_id} ({key.path}; "
                              "refused)") from None
        return Signature(key.key_id, key.path, identity_sha256, engines)
