"""The HTTP server: OpenAI and Anthropic APIs, named caches, metrics (see create_app)."""

from radixserve.server.app import create_app
from radixserve.server.config import ServerConfig

__all__ = ["create_app", "ServerConfig"]
