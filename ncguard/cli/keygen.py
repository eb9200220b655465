"""`ncguard keygen --out PREFIX`: an Ed25519 key pair for signing models.

PREFIX.key is the private key (mode 0600): keep it where models are exported or fitted, and give
it to `ncguard export ... --sign-key` or `ncguard fit ... --sign-key`. PREFIX.pub is the public
key: give it to `serve`, `predict` and `evaluate` (`--verify-key` or $NCGUARD_VERIFY_KEY), which
then refuse any model it did not sign. Torch-free; the crypto is in ncguard.signing.
"""

from __future__ import annotations

import argparse

from ..signing import fingerprint, load_public_key, write_key_pair


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, metavar="PREFIX", help="writes PREFIX.key (private, mode 0600) and PREFIX.pub (public)")
    p.add_argument("--force", action="store_true", help="replace an existing key pair (models signed with the old key stop verifying)")


def run(args: argparse.Namespace) -> int:
    private_path, public_path = write_key_pair(args.out, force=args.force)
    print(f"wrote {private_path} (private: keep it secret, sign with --sign-key {private_path})")
    print(f"wrote {public_path} (public: verify with --verify-key {public_path}); key {fingerprint(load_public_key(public_path))}")
    return 0
