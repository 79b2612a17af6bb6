"""The ``remote`` backend: hosted image APIs (OpenAI-compatible Images, Chutes) behind catalog endpoints."""

from workers.backends.remote.answers import RemoteApiError
from workers.backends.remote.backend import RemoteBackend
from workers.backends.remote.retry import RetryPolicy
from workers.backends.remote.spool import ImageTooLarge, NotAnImage

__all__ = ["ImageTooLarge", "NotAnImage", "RemoteApiError", "RemoteBackend", "RetryPolicy"]
