"""Test servers that stand in for real backends (kept out of the package)."""
