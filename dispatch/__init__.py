"""dispatch: plan, send and show high-volume message campaigns."""

__version__ = "0.1.0"

__all__ = ["__version__"]
