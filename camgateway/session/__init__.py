"""The session layer: one camera connection (the Protocol, its states, the state machine, leasing)."""
