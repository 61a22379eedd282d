"""cpet."""
