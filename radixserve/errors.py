"""Typed errors that users can cause. The server maps each to its API's error format."""


class RadixServeError(Exception):
    """Base class of every error radixserve raises on purpose."""


class InvalidRequestError(RadixServeError, ValueError):
    """The request is malformed: empty prompt, negative max_tokens, bad sampling values..."""


class PromptTooLongError(InvalidRequestError):
    """The prompt (plus max_tokens) does not fit the model's context window."""


class ModelLoadError(RadixServeError):
    """The model source is missing, malformed, or of an unsupported architecture."""


class NotFoundError(RadixServeError, KeyError):
    """A named resource (cache, request) does not exist or has expired."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0]) if self.args else ""


class NoFreeBlocksError(RadixServeError):
    """Internal: the block pool cannot satisfy an allocation (the engine evicts or preempts)."""
