"""radixserve: an LLM inference engine and server built around automatic prefix caching."""

__version__ = "0.1.0"
