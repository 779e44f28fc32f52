"""ApCM server: codec, memory banks and the gRPC service around them."""
