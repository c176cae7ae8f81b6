"""A LlamaIndex node postprocessor (``BaseNodePostprocessor``) that reranks with grating.

Needs ``llama-index-core`` (``pip install './python[llamaindex]'``); importing this module is
what imports LlamaIndex. Pass it where LlamaIndex takes postprocessors::

    from grating.llama_index import GratingRerank
    rerank = GratingRerank(model="path/or/hub-id", top_n=2)
    engine = index.as_query_engine(similarity_top_k=10, node_postprocessors=[rerank])

Like LlamaIndex's ``SentenceTransformerRerank``, it scores each node's content with its
embed-mode metadata, and returns the ``top_n`` nodes best first as ``NodeWithScore`` whose
``score`` is grating's relevance score (the node objects themselves are kept).
"""

from __future__ import annotations

from typing import Any, List, Optional

try:
    from llama_index.core.bridge.pydantic import Field, PrivateAttr
    from llama_index.core.postprocessor.types import BaseNodePostprocessor
    from llama_index.core.schema import MetadataMode, NodeWithScore, QueryBundle
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "grating.llama_index needs llama-index-core: pip install llama-index-core "
        "(or the package's [llamaindex] extra)"
    ) from e

from ._adapters import check_top_n, resolve_reranker

__all__ = ["GratingRerank"]


class GratingRerank(BaseNodePostprocessor):
    """Reranks retrieved nodes with a grating cross-encoder and keeps the ``top_n``.

    Args:
        model: a model to load (a local directory or a hub id), or
        reranker: a loaded :class:`grating.Reranker`.
        top_n: nodes to keep (default 2, as LlamaIndex's rerankers).
        exact: no pruning: full inference's top ``top_n`` and scores.
        **reranker_kwargs: :class:`grating.Reranker` arguments when ``model`` is given.
    """

    model: Optional[str] = Field(default=None, description="The grating model loaded.")
    top_n: int = Field(default=2, description="Nodes to keep.")
    exact: bool = Field(default=False, description="No pruning (full inference's top N).")
    _reranker: Any = PrivateAttr()

    def __init__(
        self,
        model: Optional[str] = None,
        top_n: int = 2,
        exact: bool = False,
        reranker: Any = None,
        **reranker_kwargs: Any,
    ) -> None:
        check_top_n("top_n", top_n)
        loaded = resolve_reranker(reranker, model, reranker_kwargs)
        super().__init__(model=loaded.model, top_n=top_n, exact=exact)
        self._reranker = loaded

    @classmethod
    def class_name(cls) -> str:
        return "GratingRerank"

    @property
    def reranker(self) -> Any:
        """The :class:`grating.Reranker` this postprocessor uses."""
        return self._reranker

    def _postprocess_nodes(
        self,
        nodes: List[NodeWithScore],
        query_bundle: Optional[QueryBundle] = None,
    ) -> List[NodeWithScore]:
        if query_bundle is None:
            raise ValueError("GratingRerank needs the query (a query bundle or query_str)")
        if not nodes:
            return []
        texts = [n.node.get_content(metadata_mode=MetadataMode.EMBED) for n in nodes]
        ranked = self._reranker.rank(
            query_bundle.query_str,
            texts,
            top_k=min(self.top_n, len(nodes)),
            exact=self.exact,
        )
        return [NodeWithScore(node=nodes[r["corpus_id"]].node, score=r["score"]) for r in ranked]
