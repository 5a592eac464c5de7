"""The package version, in a module of its own so that every layer (the checkpoint metadata, the model card) can
read it without importing the package's top level; ``pyproject.toml`` reads it from here too."""

__version__ = "0.1.0"
