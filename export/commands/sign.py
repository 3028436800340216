"""`edge-export keygen KEY` and `edge-export sign BUNDLE --key KEY`: signed bundles (core.signing).

The private key stays on the workstation that ships bundles; its `.pub` goes to each device, named in the
service config's `security.trusted_keys`. Signing writes `bundle.sig` beside bundle.yaml and changes nothing
else, so the model id is the same before and after; re-signing (another key, a re-issued bundle, an engine or
mixed-precision graph added with `edge-export tensorrt`) replaces it. Sign last: the engines/ files present
when signing are the ones a device requiring signatures will use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from edge_inspector.core.atomic import write_atomic
from edge_inspector.core.bundle import ENGINE_PREFIX, Bundle
from edge_inspector.core.signing import (
    SIGNATURE_FILE,
    TrustedKey,
    TrustPolicy,
    generate_keypair,
    key_id_of,
    load_private_key,
    signature_document,
)


def public_key_path(private_path: Path) -> Path:
    return private_path.with_name(private_path.name + ".pub")


def sign_bundle(bundle_path: Path, key_path: Path, key: Any = None) -> Bundle:
    """Verify the bundle's files, write bundle.sig over its identity digest and check it as a device would."""
    key = key if key is not None else load_private_key(key_path)
    bundle = Bundle.load(bundle_path)  # every file's sha256 checked: never sign a damaged bundle
    bundle.release()
    engines = {rel: sha for rel, sha in bundle.meta.files.items() if rel.startswith(ENGINE_PREFIX)}
    write_atomic(bundle.path / SIGNATURE_FILE, signature_document(key, bundle.identity_sha256, bundle.model_id,
                                                                  engines))
    public = key.public_key()
    policy = TrustPolicy([TrustedKey(key_id_of(public), public_key_path(key_path), public)], required=True)
    checked = Bundle.load(bundle.path, trust=policy, verify=False)  # the signature as a device checks it
    return checked


@click.command("keygen")
@click.argument("key_file", type=click.Path(path_type=Path))
def keygen_command(key_file: Path) -> None:
    """Make an Ed25519 signing key: KEY_FILE (private, mode 0600: keep it on this workstation) and
    KEY_FILE.pub (copy it to each device and name it in security.trusted_keys). Never overwrites."""
    key_id = generate_keypair(key_file, public_key_path(key_file))
    click.echo(f"signing key {key_file} (keep it private), public key {public_key_path(key_file)}; key id {key_id}")


@click.command("sign")
@click.argument("bundle_dir", type=click.Path(path_type=Path))
@click.option("--key", "key_file", required=True, type=click.Path(path_type=Path),
              help="The private key from `edge-export keygen`.")
def sign_command(bundle_dir: Path, key_file: Path) -> None:
    """Sign BUNDLE_DIR (writes BUNDLE_DIR/bundle.sig) so devices with security.require_signed_bundles take it."""
    bundle = sign_bundle(bundle_dir, key_file)
    assert bundle.signature is not None  # sign_bundle re-loads it as a device would
    click.echo(f"{bundle.path / SIGNATURE_FILE}: {bundle.model_id} signed by key {bundle.signature.key_id}")
