"""Fresh ED25519 SSH key pairs in OpenSSH formats."""

from __future__ import annotations

from dataclasses import dataclass, field

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey


@dataclass(frozen=True, slots=True)
class SshKeyPair:
    """An OpenSSH private key (kept out of `repr`) and its `ssh-ed25519 AAAA... comment` line."""

    private_openssh: str = field(repr=False)
    public_openssh: str


def generate_ed25519(comment: str = "hero-deployer") -> SshKeyPair:
    """Generates a key pair; the public line ends with `comment`."""
    if not comment or any(c.isspace() for c in comment):
        raise ValueError("the key comment must be one non-empty word")
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.OpenSSH,
        encryption_algorithm=serialization.NoEncryption(),
    ).decode()
    public = key.public_key().public_bytes(
        encoding=serialization.Encoding.OpenSSH, format=serialization.PublicFormat.OpenSSH
    )
    return SshKeyPair(private_openssh=private, public_openssh=f"{public.decode()} {comment}")
