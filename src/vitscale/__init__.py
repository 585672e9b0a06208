"""vitscale: design, scale, train and evaluate Vision Transformers."""

from vitscale.errors import CheckpointError, ConfigError, DataError, UserError

__version__ = "0.1.0"

__all__ = ["CheckpointError", "ConfigError", "DataError", "UserError", "__version__"]
