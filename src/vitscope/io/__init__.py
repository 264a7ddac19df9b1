"""Reading and writing models: vitscope's weights files (``weights``: safetensors with a JSON sidecar), foreign
timm checkpoints and the hub (``checkpoints``), training runs (``runs``), and atomic writes (``atomic``)."""
from vitscope.io.checkpoints import CheckpointError, load_checkpoint, load_model, read_state_dict  # noqa: F401
from vitscope.io.weights import load_weights, read_sidecar, save_weights, sidecar_path  # noqa: F401

__all__ = [
    "CheckpointError", "load_checkpoint", "load_model", "load_weights", "read_sidecar", "read_state_dict",
    "save_weights", "sidecar_path",
]
