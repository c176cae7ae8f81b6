"""A Haystack 2 ranker component that reranks with grating.

Needs ``haystack-ai`` (``pip install './python[haystack]'``); importing this module is what
imports Haystack. Put it after a retriever in a pipeline::

    from grating.haystack import GratingRanker
    pipe.add_component("ranker", GratingRanker(model="path/or/hub-id", top_k=3))
    pipe.connect("retriever.documents", "ranker.documents")
    pipe.run({"retriever": {"query": q}, "ranker": {"query": q}})

Like Haystack's own similarity rankers, ``run(query, documents, top_k)`` returns
``{"documents": [...]}``, the ``top_k`` best first, each a copy of the document given (same
id, content and meta) with ``score`` set to grating's relevance score. The model is loaded in
``warm_up()`` (the pipeline calls it), or at once when a loaded ``reranker`` is passed.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional

try:
    from haystack import Document, component, default_from_dict, default_to_dict
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "grating.haystack needs haystack-ai: pip install haystack-ai "
        "(or the package's [haystack] extra)"
    ) from e

from ._adapters import check_top_n, resolve_reranker

__all__ = ["GratingRanker"]


@component
class GratingRanker:
    """Ranks documents for a query with a grating cross-encoder.

    Args:
        model: a model to load in ``warm_up`` (a local directory or a hub id), or
        reranker: a loaded :class:`grating.Reranker`.
        top_k: documents to return unless ``run`` says (default 10, as Haystack's rankers).
        exact: no pruning: full inference's top K and scores.
        meta_fields_to_embed: meta fields whose values are put before the content, joined by
            ``embedding_separator`` (as Haystack's rankers).
        score_threshold: return only documents scoring at least this (unless ``run`` says).
        reranker_kwargs: :class:`grating.Reranker` arguments for ``model``.
    """

    def __init__(
        self,
        model: Optional[str] = None,
        top_k: int = 10,
        exact: bool = False,
        meta_fields_to_embed: Optional[List[str]] = None,
        embedding_separator: str = "\n",
        score_threshold: Optional[float] = None,
        reranker: Any = None,
        reranker_kwargs: Optional[Dict[str, Any]] = None,
    ) -> None:
        check_top_n("top_k", top_k)
        if reranker is None and model is None:
            raise ValueError("give a model (a local directory or a hub id) or a loaded reranker")
        if reranker is not None:
            reranker = resolve_reranker(reranker, model, reranker_kwargs or {})
        self.model = model
        self.top_k = top_k
        self.exact = exact
        self.meta_fields_to_embed = list(meta_fields_to_embed or [])
        self.embedding_separator = embedding_separator
        self.score_threshold = score_threshold
        self.reranker_kwargs = dict(reranker_kwargs or {})
        self._reranker = reranker

    def to_dict(self) -> Dict[str, Any]:
        """Serializes the component by its model's name (a loaded reranker is not saved)."""
        model = self.model if self.model is not None else self._reranker.model
        return default_to_dict(
            self,
            model=model,
            top_k=self.top_k,
            exact=self.exact,
            meta_fields_to_embed=self.meta_fields_to_embed,
            embedding_separator=self.embedding_separator,
            score_threshold=self.score_threshold,
            reranker_kwargs=self.reranker_kwargs,
        )

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "GratingRanker":
        return default_from_dict(cls, data)

    def warm_up(self) -> None:
        """Loads the model (once)."""
        if self._reranker is None:
            self._reranker = resolve_reranker(None, self.model, self.reranker_kwargs)

    def _text(self, doc: Document) -> str:
        meta = [str(doc.meta[f]) for f in self.meta_fields_to_embed if doc.meta.get(f) is not None]
        return self.embedding_separator.join(meta + [doc.content or ""])

    @component.output_types(documents=List[Document])
    def run(
        self,
        query: str,
        documents: List[Document],
        top_k: Optional[int] = None,
        score_threshold: Optional[float] = None,
    ) -> Dict[str, List[Document]]:
        """The ``top_k`` of ``documents`` for ``query``, best first, with ``score`` set (and at
        least ``score_threshold``, when given here or at construction)."""
        k = check_top_n("top_k", self.top_k if top_k is None else top_k)
        if not documents:
            return {"documents": []}
        self.warm_up()
        ranked = self._reranker.rank(
            query,
            [self._text(d) for d in documents],
            top_k=min(k, len(documents)),
            exact=self.exact,
        )
        threshold = self.score_threshold if score_threshold is None else score_threshold
        out = [dataclasses.replace(documents[r["corpus_id"]], score=r["score"]) for r in ranked]
        if threshold is not None:
            out = [d for d in out if d.score >= threshold]
        return {"documents": out}
