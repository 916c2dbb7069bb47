"""The delivery layer: the outbox and the sinks that take each stored file where it belongs."""
