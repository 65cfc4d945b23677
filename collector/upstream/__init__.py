"""A collector as the client of its upstream tier: enrollment, the forwarder, its state directory."""
