"""Generated protobuf modules and their sources; see protos/regenerate.py."""
