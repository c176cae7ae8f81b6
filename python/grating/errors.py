"""The package's exceptions.

Every failure of the engine is raised as a :class:`GratingError` whose message is the one the
``grating`` CLI prints and whose ``kind`` is the engine's stable error type (the server's
``error_type``): ``invalid_request``, ``limit_exceeded``, ``memory_budget``, ``tokenizer``,
``model_files``, ``cancelled``, ``non_finite_score``, ``backend``, ``io`` or ``internal``.

Mistakes the caller can fix (the first four kinds) are :class:`InvalidRequestError`, which is
also a :class:`ValueError`, so ``except ValueError`` catches them as it would in any Python
library. Arguments of the wrong Python type raise :class:`TypeError`, and out-of-range argument
values checked before the engine is called raise :class:`ValueError`.
"""

from __future__ import annotations

__all__ = ["GratingError", "InvalidRequestError"]

#: The engine's error types that are the caller's to fix (a 4xx status in the server).
CLIENT_KINDS = frozenset({"invalid_request", "limit_exceeded", "memory_budget", "tokenizer"})


class GratingError(Exception):
    """An error of the grating engine (a missing or broken model, an engine fault, ...).

    Attributes:
        kind: the engine's error type, e.g. ``"model_files"`` or ``"internal"``.
    """

    def __init__(self, message: str, kind: str = "internal") -> None:
        super().__init__(message)
        self.kind = kind

    def __reduce__(self):  # keeps `kind` through pickling (multiprocessing)
        return (type(self), (str(self), self.kind))


class InvalidRequestError(GratingError, ValueError):
    """A request the engine refused because of its input: an empty query or document list,
    ``top_k=0``, a length beyond the model's, a memory budget too small, untokenizable text."""

    def __init__(self, message: str, kind: str = "invalid_request") -> None:
        super().__init__(message, kind)
