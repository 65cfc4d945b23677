"""Sensors: pure, typed readings of the local host (interfaces, accounting, capture, sockets, inventory)."""
