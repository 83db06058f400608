"""selfnpo: Self-NPO negative offsets for diffusion models."""

__version__ = "0.1.0"

from .npo import NPOGuidance  # noqa: E402

__all__ = ["NPOGuidance", "__version__"]
