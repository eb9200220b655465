"""Ed25519 keys and signatures for model files: who made a model, not just whether it is intact.

The model checksum (ncguard.model_file.model_checksum) is an unkeyed sha256: it catches accidents
(a truncated copy, a bit flip, a hand edit that forgot to recompute it), but anyone can edit the
threshold and recompute it with ncguard's own function. A signature cannot be recomputed without
the private key. Ed25519 (from the `cryptography` package, a maintained binding to OpenSSL) rather
than HMAC-SHA256: the serving side then holds only a public key, which reveals nothing that would
let a compromised server sign models, and one signing key can serve any number of deployments.

Keys are PEM files as OpenSSL writes them (PKCS#8 private key, SubjectPublicKeyInfo public key),
made by `ncguard keygen --out PREFIX`. What exactly is signed is model_file.signed_message; this
module knows keys and bytes only. Every failure is a ConfigError (a bad key file) or a ModelError
(a model that fails verification) with a message that says what to do.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .atomic import atomic_write
from .errors import ConfigError, ModelError

ALGORITHM = "ed25519"
VERIFY_KEY_ENV = "NCGUARD_VERIFY_KEY"  # the same variable serving.settings reads in the workers
MAX_KEY_FILE_BYTES = 64 * 1024  # an Ed25519 PEM is ~120 bytes; anything larger is not a key file


def _read_key_file(path: str | os.PathLike, flag: str) -> bytes:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{flag} {path} is a directory, not a key file")
    try:
        if path.stat().st_size > MAX_KEY_FILE_BYTES:
            raise ConfigError(f"{flag} {path} is too large to be an Ed25519 key file")
        return path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{flag} {path}: key file not found (make a key pair with `ncguard keygen --out PREFIX`)") from None
    except OSError as exc:
        raise ConfigError(f"{flag} {path} cannot be read: {exc.strerror or exc}") from None


def load_private_key(path: str | os.PathLike, flag: str = "--sign-key") -> Ed25519PrivateKey:
    """The Ed25519 private key in a PEM file (PREFIX.key of `ncguard keygen`)."""
    data = _read_key_file(path, flag)
    if b"PUBLIC KEY" in data:
        raise ConfigError(f"{flag} {path} holds a public key; signing needs the private key (the .key file of `ncguard keygen`)")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:  # encrypted PEM without a password
        raise ConfigError(f"{flag} {path} is password-protected; ncguard reads unencrypted keys (protect the file by its permissions)") from None
    except Exception as exc:  # noqa: BLE001 - cryptography raises ValueError or UnsupportedAlgorithm
        raise ConfigError(f"{flag} {path} is not a PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{flag} {path} is a {type(key).__name__}, not an Ed25519 key (make one with `ncguard keygen`)")
    return key


def load_public_key(path: str | os.PathLike, flag: str = "--verify-key") -> Ed25519PublicKey:
    """The Ed25519 public key in a PEM file (PREFIX.pub of `ncguard keygen`)."""
    data = _read_key_file(path, flag)
    if b"PRIVATE KEY" in data:
        raise ConfigError(f"{flag} {path} holds a private key; verification needs only the public key (the .pub file), "
                          "and the private key should not be on the machines that load models")
    try:
        key = serialization.load_pem_public_key(data)
    except Exception as exc:  # noqa: BLE001 - cryptography raises ValueError or UnsupportedAlgorithm
        raise ConfigError(f"{flag} {path} is not a PEM public key: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{flag} {path} is a {type(key).__name__}, not an Ed25519 key (make one with `ncguard keygen`)")
    return key


def fingerprint(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """`sha256:<hex>` of the raw public key: names a key in metadata and messages without the key itself."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def short(fp: str) -> str:
    return fp[: len("sha256:") + 16]


def sign(key: Ed25519PrivateKey, message: bytes) -> str:
    """The JSON value stored as `ncguard.signature`: algorithm, key fingerprint, base64 signature."""
    return json.dumps({"algorithm": ALGORITHM, "key": fingerprint(key), "signature": base64.b64encode(key.sign(message)).decode()})


def verify(key: Ed25519PublicKey, stored: str | None, message: bytes, what: str) -> str:
    """Check `stored` (the `ncguard.signature` value, or None) over `message`; the signer's fingerprint, or ModelError."""
    expected = fingerprint(key)
    if stored is None:
        raise ModelError(f"{what} is not signed, and a verify key ({short(expected)}) was given: refusing it. "
                         "Sign it with `ncguard export ... --sign-key FILE` (or `ncguard fit ... --sign-key FILE`)")
    try:
        value = json.loads(stored)
        algorithm, signer, signature = value["algorithm"], value["key"], base64.b64decode(value["signature"], validate=True)
    except (ValueError, TypeError, KeyError):
        raise ModelError(f"{what} has a malformed signature (ncguard.signature): refusing it") from None
    if algorithm != ALGORITHM:
        raise ModelError(f"{what} is signed with {algorithm!r}, not {ALGORITHM}: refusing it")
    if signer != expected:
        raise ModelError(f"{what} was signed by key {short(str(signer))}, not by the verify key {short(expected)}: refusing it "
                         "(wrong key, or a model from somewhere else)")
    try:
        key.verify(signature, message)
    except InvalidSignature:
        raise ModelError(f"{what} does not match its signature: it was modified after it was signed; refusing it") from None
    return signer


def verify_key_path(flag_value: str | None) -> str | None:
    """The verify key a command uses: its --verify-key flag, else $NCGUARD_VERIFY_KEY, else none."""
    value = (flag_value or os.environ.get(VERIFY_KEY_ENV, "")).strip()
    return value or None


def write_key_pair(prefix: str | os.PathLike, *, force: bool = False) -> tuple[Path, Path]:
    """PREFIX.key (private, mode 0600) and PREFIX.pub (public), each written atomically.

    Refuses to overwrite either file unless `force`: replacing a signing key by accident would
    make every deployment that trusts the old public key refuse the next model.
    """
    private_path, public_path = Path(f"{prefix}.key"), Path(f"{prefix}.pub")
    if not force:
        existing = [str(p) for p in (private_path, public_path) if p.exists()]
        if existing:
            raise ConfigError(f"{', '.join(existing)} already exist(s); choose another --out or pass --force to replace the key pair")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    atomic_write(private_path, private_pem, mode=0o600)  # mkstemp creates it 0600: never readable by others, even briefly
    atomic_write(public_path, public_pem, mode=0o644)
    return private_path, public_path
