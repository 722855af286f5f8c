"""A teacher model behind an HTTP server: the reference server of the protocol
:class:`~distillery.teachers.server.ServerTeacher` speaks (a subset of vLLM's OpenAI-compatible API).

FastAPI and uvicorn are imported when an app is created (the ``serve`` extra).
"""

from distillery.serving.app import create_app, free_port, launch, serve

__all__ = ["create_app", "free_port", "launch", "serve"]
