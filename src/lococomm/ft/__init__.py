"""Fault tolerance: the Manager step protocol, epochs, healing and bit-parity."""
