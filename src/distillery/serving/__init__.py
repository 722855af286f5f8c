"""A teacher model behind an HTTP server: the reference server of the protocol
:class:`~distillery.teachers.server.ServerTeacher` speaks (a subset of vLLM's OpenAI-compatible API).

FastAPI and uvicorn are imported when an app is created (the ``serve`` extra).
"""

from distillery.serving.app import create_app, serve

__all__ = ["create_app", "serve"]
