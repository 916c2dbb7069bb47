"""The transfer layer: one file on its way in (receiving, the spool, making it durable, finish notes)."""
