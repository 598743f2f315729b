"""Coordinator service and client: who is in, which epoch, did a step commit."""
