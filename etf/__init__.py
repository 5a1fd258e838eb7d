"""etf: ET-Fuser over frozen face encoders, with a content-addressed token cache."""

from etf.errors import EtfError

__version__ = "0.1.0"
__all__ = ["EtfError", "__version__"]
