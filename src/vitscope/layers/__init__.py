"""Reusable layers, one concept per file."""
from vitscope.layers.blur import Blur, SpatialSmoothing  # noqa: F401
from vitscope.layers.context_broadcast import ContextBroadcast, cbs_scales  # noqa: F401
from vitscope.layers.window_attention import WindowAttention2d  # noqa: F401
