"""The built-in model zoo and rebuilding modules from their architecture spec."""

from .arch import build_model
from .zoo import ZOO, ZooEntry

__all__ = ["ZOO", "ZooEntry", "build_model"]
