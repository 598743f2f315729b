"""Collective algorithms over one epoch's process group; they never block past an abort."""
