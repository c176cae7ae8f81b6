"""What the framework adapters share: one reranker from a model name or an instance."""

from __future__ import annotations

from typing import Any, Dict, Optional


def resolve_reranker(reranker: Any, model: Optional[str], kwargs: Dict[str, Any]) -> Any:
    """``reranker`` when given (a :class:`grating.Reranker`), else one loaded from ``model``
    with ``kwargs`` (the :class:`grating.Reranker` arguments)."""
    from . import Reranker

    if reranker is not None:
        if model is not None or kwargs:
            raise ValueError("give either a loaded reranker or a model to load, not both")
        if not isinstance(reranker, Reranker):
            raise TypeError(
                f"reranker must be a grating.Reranker, got {type(reranker).__name__}"
            )
        return reranker
    if model is None:
        raise ValueError("give a model (a local directory or a hub id) or a loaded reranker")
    return Reranker(model, **kwargs)


def check_top_n(name: str, n: Any) -> int:
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"{name} must be an int, got {type(n).__name__}")
    if n < 1:
        raise ValueError(f"{name} must be at least 1, got {n}")
    return n
