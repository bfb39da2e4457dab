"""A deterministic Ed25519 signer for audit logs in tests and benchmarks."""

from __future__ import annotations

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

KEY_SEED = bytes(range(32))


class Ed25519Signer:
    """The audit log's ``Signer`` backed by an Ed25519 key made from ``seed``."""

    def __init__(self, key_id: str = "test-key", seed: bytes = KEY_SEED) -> None:
        self._key = Ed25519PrivateKey.from_private_bytes(seed)
        self._public = self._key.public_key()
        self.key_id = key_id

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data)

    def verify(self, data: bytes, signature: bytes) -> bool:
        try:
            self._public.verify(signature, data)
        except InvalidSignature:
            return False
        return True
