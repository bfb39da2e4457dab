"""isolation layer."""
