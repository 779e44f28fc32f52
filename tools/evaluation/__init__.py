"""Held-out evaluation of codecs against baselines at equal bytes per code."""
