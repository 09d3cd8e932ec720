"""The guest side: the Linux memory-manager model (``mm``) and the protocol drivers on top."""
