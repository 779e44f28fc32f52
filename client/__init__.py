"""ApCM client SDK (no torch needed)."""
