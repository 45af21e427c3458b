"""cachegw gateway: the gRPC service in front of Redis."""
