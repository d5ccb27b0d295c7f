"""Adapters that do I/O around the pure core: ZeroMQ runtime, clock."""
