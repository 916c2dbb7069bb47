"""Optional speed-ups, each behind one setting of the ``performance:`` section (see docs/performance.md)."""
