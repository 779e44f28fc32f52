"""Tools around the server, not part of it: training, evaluation and benchmarks.

Installed from a source checkout (``make install``) and left out of the serving
image. May import anything in ``apcm.server`` and ``apcm.client``; nothing in
``apcm.server`` imports this package (the CLI looks its commands up by name).
"""
