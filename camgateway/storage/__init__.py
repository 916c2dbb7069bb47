"""The storage layer: what survives a restart (resume and outbox records, in SQLite, Redis or memory)."""
