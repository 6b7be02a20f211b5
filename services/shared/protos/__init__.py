"""Generated gRPC code for protos/mso/v1 (scripts/gen_protos.py)."""
