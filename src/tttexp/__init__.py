"""tttexp: train TTT-Linear and TTT-MLP language models from one Hydra app."""

__version__ = "0.1.0"
