"""Vendor simulators: real HTTP servers on loopback with fault injection."""
