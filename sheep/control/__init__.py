"""Control plane: gRPC service for admin and cluster operations (dog talks to it)."""
