"""Reading and writing Hugging Face model folders: config.json and safetensors weights only.

Pickled weights (``pytorch_model.bin``, ``*.pt``) are refused on purpose: unpickling runs code.
"""

from evomerge.io.config import read_config
from evomerge.io.safetensors_reader import TensorIndex, read_safetensors_header
from evomerge.io.safetensors_writer import ShardedSafetensorsWriter, TensorSpec

__all__ = [
    "ShardedSafetensorsWriter",
    "TensorIndex",
    "TensorSpec",
    "read_config",
    "read_safetensors_header",
]
