"""Serving helpers shared by the protocol apps: paths, producers, responses."""
