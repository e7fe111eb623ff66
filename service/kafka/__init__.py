"""The Kafka side of the bridge: topic admin and the changelog restore (more to follow)."""
