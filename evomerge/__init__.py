"""evomerge: search for model-merge recipes by evolution."""

__version__ = "0.1.0"
