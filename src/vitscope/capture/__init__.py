"""Capture attention maps, residual streams and branch outputs from any supported model."""
from vitscope.capture._capture import Capture, SubLayerRecord, capture, explicit_attention  # noqa: F401
from vitscope.capture._layout import LayerInfo, tokens_to_map  # noqa: F401
