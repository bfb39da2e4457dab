"""Workload identity: a built-in certificate authority and short-lived run tokens (SPIFFE-style).

Every agent has a SPIFFE id ``spiffe://<trust_domain>/agent/<name>`` (:mod:`.spiffe`). The platform keeps one
Ed25519 root key for the trust domain (:class:`~.ca.CertificateAuthority`, stored under ``<state_dir>/ca/``) and
uses it for two things:

* **Run tokens** (:class:`~.tokens.TokenService`): JWT-SVID-shaped tokens (``alg=EdDSA``, ``kid`` = the CA key id)
  that an agent presents on every tool call. They live minutes, name one run, and can be revoked one by one or a
  whole run at a time. Revocations (:class:`~.revocation.Revocations`) are persisted in the store table
  ``revoked_tokens``.
* **X.509-SVIDs** (:meth:`~.ca.CertificateAuthority.issue_agent_svid`): leaf certificates whose only URI SAN is the
  agent's SPIFFE id, signed by the self-signed root certificate.

Verification sits on the hot path of every tool call, so :meth:`~.tokens.TokenService.verify` keeps a bounded LRU
cache of fully verified claims keyed by the SHA-256 of the token; a cache hit skips the signature check but
never the expiry, audience and revocation checks.
"""
