"""What both gRPC edges (``api`` and ``cluster``) share, so neither imports the other.

``status``: domain errors -> gRPC statuses, the one place a call is aborted.
``convert``: the domain -> proto conversions both need (``bank_info``).

May import ``domain`` (its result types), ``wire``, ``apcm.v1``, grpc and the shared
modules; never ``api``, ``cluster``, ``memory`` or ``persistence``.
"""
