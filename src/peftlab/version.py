"""The package version, in a leaf module anything may import (the server reports it)."""

__version__ = "0.1.0"
