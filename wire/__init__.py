"""The wire format shared by the client SDK and the server: tensors <-> ``apcm.v1``.

May import: numpy and the generated ``apcm.v1`` stubs only (no torch, no grpc
server code), so the client installs without torch and the server does not
depend on the client.
"""
