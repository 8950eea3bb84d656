"""Helpers shared by the test suites: a controllable upstream, a daemon runner, tool checks."""
