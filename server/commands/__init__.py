"""Sub-commands of the ``apcm`` CLI; each module defines ``register(subparsers)``."""
