"""Reusable layers, one concept per file."""
from vitscope.layers.context_broadcast import ContextBroadcast  # noqa: F401
