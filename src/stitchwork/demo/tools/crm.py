"""Demo CRM tool: needs the ``crm_api_key`` secret, which the gateway injects into this sandbox only.

It echoes a key fingerprint the careless way real tools sometimes do (the key itself in its debug output) so the
demo can show the gateway redacting it before the model, the logs or the audit log see it."""

from __future__ import annotations

import hashlib
import os


def crm_lookup(email: str) -> dict[str, str]:
    """Looks up a contact (demo data) using the CRM API key."""
    key = os.environ.get("STITCHWORK_SECRET_CRM_API_KEY", "")
    if not key:
        raise PermissionError("CRM API key was not injected")
    contacts = {
        "carol@example.com": "Carol Diaz, Head of Planning, Example Corp",
        "billing@vendor.example": "Vendor Ltd accounts receivable",
    }
    return {
        "email": email,
        "contact": contacts.get(email, "unknown contact"),
        "debug": f"authenticated with key {key} (sha256 {hashlib.sha256(key.encode()).hexdigest()[:8]})",
    }
