"""selfnpo: Self-NPO negative offsets for diffusion models."""

__version__ = "0.1.0"
