"""Reading and writing model weights (safetensors with a JSON sidecar, and timm checkpoints)."""
from vitscope.io.weights import (  # noqa: F401
    CheckpointError,
    load_checkpoint,
    load_model,
    load_weights,
    read_sidecar,
    read_state_dict,
    save_weights,
    sidecar_path,
)

__all__ = [
    "CheckpointError", "load_checkpoint", "load_model", "load_weights", "read_sidecar", "read_state_dict",
    "save_weights", "sidecar_path",
]
