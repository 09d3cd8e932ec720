"""Generated from proto/memhp/v1 by scripts/gen_protos.py: do not edit."""
