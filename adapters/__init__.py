"""Ingest: Merlin TCP and MIB files, ZeroMQ frame and spectrum streams, scan-position joining."""
