"""Codecs the server serves: the interface and file format (``base``), PCA,
the IDRP flow (``idrp``) and the code quantisers (``quant``).

May import torch, safetensors and the shared modules; never grpc, ``memory``
or ``domain``.
"""
