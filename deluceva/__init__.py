"""Deluceva: CNN inference on video that computes only what changed between frames."""

from deluceva.errors import DelucevaError
from deluceva.planner import Model, load_model
from deluceva.session import Session

__all__ = ["DelucevaError", "Model", "Session", "load_model"]
__version__ = "0.1.0"
