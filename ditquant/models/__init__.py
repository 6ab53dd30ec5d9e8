"""Models: the in-memory DiT (``dit``), checkpoint conversion (``original``) and the one loader (``loading``)."""
