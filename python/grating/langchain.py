"""A LangChain document compressor (``BaseDocumentCompressor``) that reranks with grating.

Needs ``langchain-core`` (``pip install './python[langchain]'``); importing this module is
what imports LangChain. Use it wherever LangChain takes a compressor (a
``ContextualCompressionRetriever``, or a chain step)::

    from grating.langchain import GratingRerank
    compressor = GratingRerank(model="path/or/hub-id", top_n=3)
    docs = compressor.compress_documents(retrieved_docs, "the query")

Like LangChain's Cohere and cross-encoder rerankers, it returns the ``top_n`` documents best
first, each a copy of the document given (same ``page_content``, ``id`` and metadata) with the
score in ``metadata["relevance_score"]`` (grating's relevance score, as
:meth:`grating.Reranker.rank`'s ``score``).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

try:
    from langchain_core.callbacks import Callbacks
    from langchain_core.documents import BaseDocumentCompressor, Document
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "grating.langchain needs langchain-core: pip install langchain-core "
        "(or the package's [langchain] extra)"
    ) from e

from pydantic import ConfigDict, Field, model_validator

from ._adapters import check_top_n, resolve_reranker

__all__ = ["GratingRerank"]


class GratingRerank(BaseDocumentCompressor):
    """Reranks retrieved documents with a grating cross-encoder and keeps the ``top_n``.

    Args:
        reranker: a loaded :class:`grating.Reranker` (shared between components), or
        model: a model to load (a local directory or a hub id), with
        reranker_kwargs: the :class:`grating.Reranker` arguments for it.
        top_n: documents to keep (default 3, as LangChain's rerankers).
        exact: no pruning: full inference's top ``top_n`` and scores.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")

    reranker: Any = None
    model: Optional[str] = None
    reranker_kwargs: dict = Field(default_factory=dict)
    top_n: int = 3
    exact: bool = False

    @model_validator(mode="after")
    def load_reranker(self) -> "GratingRerank":
        check_top_n("top_n", self.top_n)
        if self.model is not None or self.reranker is None:
            self.reranker = resolve_reranker(self.reranker, self.model, self.reranker_kwargs)
            self.model = None
            self.reranker_kwargs = {}
        else:
            resolve_reranker(self.reranker, None, {})
        return self

    def compress_documents(
        self,
        documents: Sequence[Document],
        query: str,
        callbacks: Optional[Callbacks] = None,
    ) -> Sequence[Document]:
        """The ``top_n`` of ``documents`` for ``query``, best first, each with
        ``metadata["relevance_score"]``."""
        docs = list(documents)
        if not docs:
            return []
        ranked = self.reranker.rank(
            query,
            [d.page_content for d in docs],
            top_k=min(self.top_n, len(docs)),
            exact=self.exact,
        )
        out = []
        for r in ranked:
            d = docs[r["corpus_id"]]
            metadata = dict(d.metadata)
            metadata["relevance_score"] = r["score"]
            out.append(d.model_copy(update={"metadata": metadata}))
        return out
