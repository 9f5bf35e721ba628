import base64

import asyncssh
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from adapters.sshkeys import generate_ed25519


def test_generates_a_matching_openssh_pair() -> None:
    pair = generate_ed25519("alice@hero")

    private = serialization.load_ssh_private_key(pair.private_openssh.encode(), password=None)
    assert isinstance(private, Ed25519PrivateKey)
    kind, blob, comment = pair.public_openssh.split(" ")
    assert (kind, comment) == ("ssh-ed25519", "alice@hero")
    assert blob.startswith("AAAA")
    derived = private.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    assert derived.decode() == f"{kind} {blob}"
    assert len(base64.b64decode(blob)) == 51


def test_private_key_is_unencrypted_openssh_pem_readable_by_asyncssh() -> None:
    pair = generate_ed25519()

    assert pair.private_openssh.startswith("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    key = asyncssh.import_private_key(pair.private_openssh)
    assert key.export_public_key("openssh").decode().split()[:2] == pair.public_openssh.split()[:2]
    assert pair.public_openssh.endswith(" hero-deployer")


def test_every_pair_is_new() -> None:
    assert generate_ed25519().public_openssh != generate_ed25519().public_openssh


def test_repr_leaves_out_the_private_key() -> None:
    pair = generate_ed25519()

    assert "PRIVATE" not in repr(pair)
    assert pair.public_openssh in repr(pair)


@pytest.mark.parametrize("comment", ["", "two words", "line\nbreak"])
def test_a_comment_must_be_one_word(comment: str) -> None:
    with pytest.raises(ValueError):
        generate_ed25519(comment)
