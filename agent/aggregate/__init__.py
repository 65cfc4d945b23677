"""Aggregators: raw observations (packets, sockets) turned into small facts per window."""
