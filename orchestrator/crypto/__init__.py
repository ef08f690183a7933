"""Cryptography of modelip: MEK, streamed segment AEAD, MEK wrapping, evidence.

Nothing here speaks gRPC or knows about hosts; docs/formats.md is the spec.
"""
