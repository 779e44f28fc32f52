"""Tool sub-commands of the ``apcm`` CLI (train, eval, bench, fit-pca);
each module defines ``register(subparsers)``."""
