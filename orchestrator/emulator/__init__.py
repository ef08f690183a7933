"""Emulated cards and hosts: real cryptography, real gRPC, no real hardware.

Used by tests, demos and benchmarks. Imports crypto/ and qpc/, never engine/.
"""
