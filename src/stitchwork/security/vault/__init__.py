"""Secret vault port (:mod:`._base`) and its adapters: ``vault+file://`` (:mod:`.file`), ``vault+memory://``
(:mod:`.memory`)."""

from stitchwork.security.vault._base import VAULTS, Vault, open_vault, validate_secret_name, validate_secret_value

__all__ = ["VAULTS", "Vault", "open_vault", "validate_secret_name", "validate_secret_value"]
