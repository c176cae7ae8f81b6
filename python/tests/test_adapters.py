"""Each framework adapter with the real framework installed, in a pipeline of that framework:
the framework's own objects and metadata come back, reranked by grating, with the score where
that framework's rerankers put it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import candidates


@pytest.fixture(scope="module")
def corpus(dl19):
    return candidates(dl19, 11, 20)


def test_importing_grating_imports_no_framework():
    code = (
        "import sys, grating\n"
        "loaded = [m for m in ('langchain_core', 'llama_index', 'haystack') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_langchain_compressor_in_a_chain(reranker, corpus):
    pytest.importorskip("langchain_core", reason="the [langchain] extra is not installed")
    from langchain_core.documents import Document
    from langchain_core.embeddings import DeterministicFakeEmbedding
    from langchain_core.runnables import RunnableLambda, RunnableParallel, RunnablePassthrough
    from langchain_core.vectorstores import InMemoryVectorStore

    from grating.langchain import GratingRerank

    query, texts = corpus
    store = InMemoryVectorStore(DeterministicFakeEmbedding(size=16))
    store.add_documents(
        [Document(page_content=t, metadata={"source": f"doc-{i}"}, id=f"id-{i}") for i, t in enumerate(texts)]
    )
    retriever = store.as_retriever(search_kwargs={"k": len(texts)})

    # The README's snippet.
    compressor = GratingRerank(reranker=reranker, top_n=3)
    chain = RunnableParallel(docs=retriever, query=RunnablePassthrough()) | RunnableLambda(
        lambda x: compressor.compress_documents(x["docs"], x["query"])
    )
    out = chain.invoke(query)

    retrieved = retriever.invoke(query)
    want = reranker.rank(query, [d.page_content for d in retrieved], top_k=3)
    assert len(out) == 3
    for doc, w in zip(out, want):
        src = retrieved[w["corpus_id"]]
        assert isinstance(doc, Document)
        assert doc.page_content == src.page_content and doc.id == src.id
        assert doc.metadata["source"] == src.metadata["source"]
        assert doc.metadata["relevance_score"] == pytest.approx(w["score"], abs=1e-6)
        assert "relevance_score" not in src.metadata  # the retrieved documents are not changed
    assert compressor.compress_documents([], query) == []

    # Loading by model name; top_n larger than the documents returns them all.
    by_name = GratingRerank(model=reranker.model, reranker_kwargs={"profile_dir": reranker.profile_dir}, top_n=50)
    assert len(by_name.compress_documents(retrieved[:4], query)) == 4
    with pytest.raises(ValueError):
        GratingRerank(reranker=reranker, top_n=0)


def test_llama_index_postprocessor_in_a_query_engine(reranker, corpus):
    pytest.importorskip("llama_index.core", reason="the [llamaindex] extra is not installed")
    from llama_index.core import VectorStoreIndex
    from llama_index.core.embeddings import MockEmbedding
    from llama_index.core.llms import MockLLM
    from llama_index.core.schema import MetadataMode, NodeWithScore, TextNode

    from grating.llama_index import GratingRerank

    query, texts = corpus
    nodes = [TextNode(text=t, id_=f"node-{i}", metadata={"source": f"doc-{i}"}) for i, t in enumerate(texts)]
    index = VectorStoreIndex(nodes, embed_model=MockEmbedding(embed_dim=8))

    # The README's snippet.
    rerank = GratingRerank(reranker=reranker, top_n=3)
    engine = index.as_query_engine(llm=MockLLM(), similarity_top_k=len(texts), node_postprocessors=[rerank])
    response = engine.query(query)

    contents = {n.node_id: n.get_content(metadata_mode=MetadataMode.EMBED) for n in nodes}
    ids = list(contents)
    want = reranker.rank(query, [contents[i] for i in ids], top_k=3)
    got = response.source_nodes
    assert len(got) == 3
    assert [n.node.node_id for n in got] == [ids[w["corpus_id"]] for w in want]
    for n, w in zip(got, want):
        assert isinstance(n, NodeWithScore)
        assert n.score == pytest.approx(w["score"], abs=1e-6)
        assert n.node.metadata["source"] == n.node.node_id.replace("node", "doc")

    # Called directly, and with nothing to rerank.
    direct = rerank.postprocess_nodes([NodeWithScore(node=x, score=0.0) for x in nodes], query_str=query)
    assert [n.node.node_id for n in direct] == [n.node.node_id for n in got]
    assert rerank.postprocess_nodes([], query_str=query) == []
    with pytest.raises(ValueError):
        rerank.postprocess_nodes([NodeWithScore(node=nodes[0])])


def test_haystack_ranker_in_a_pipeline(reranker, corpus):
    pytest.importorskip("haystack", reason="the [haystack] extra is not installed")
    from haystack import Document, Pipeline
    from haystack.components.retrievers.in_memory import InMemoryBM25Retriever
    from haystack.document_stores.in_memory import InMemoryDocumentStore

    from grating.haystack import GratingRanker

    query, texts = corpus
    store = InMemoryDocumentStore()
    store.write_documents([Document(content=t, meta={"source": f"doc-{i}"}) for i, t in enumerate(texts)])

    pipe = Pipeline()
    pipe.add_component("retriever", InMemoryBM25Retriever(document_store=store, top_k=10))
    pipe.add_component("ranker", GratingRanker(reranker=reranker, top_k=3))
    pipe.connect("retriever.documents", "ranker.documents")
    result = pipe.run({"retriever": {"query": query}, "ranker": {"query": query}})
    out = result["ranker"]["documents"]

    retrieved = InMemoryBM25Retriever(document_store=store, top_k=10).run(query=query)["documents"]
    want = reranker.rank(query, [d.content for d in retrieved], top_k=3)
    assert len(out) == 3
    for doc, w in zip(out, want):
        src = retrieved[w["corpus_id"]]
        assert isinstance(doc, Document)
        assert doc.id == src.id and doc.content == src.content and doc.meta == src.meta
        assert doc.score == pytest.approx(w["score"], abs=1e-6)

    # run's top_k overrides the component's; no documents, no work.
    ranker = GratingRanker(model=reranker.model, reranker_kwargs={"profile_dir": reranker.profile_dir})
    ranker.warm_up()
    assert len(ranker.run(query=query, documents=retrieved, top_k=2)["documents"]) == 2
    assert ranker.run(query=query, documents=[])["documents"] == []
    ten = ranker.run(query=query, documents=retrieved, top_k=10)["documents"]
    cut = sorted(d.score for d in ten)[-2]
    above = ranker.run(query=query, documents=retrieved, top_k=10, score_threshold=cut)["documents"]
    assert [d.id for d in above] == [d.id for d in ten if d.score >= cut]
    assert len(above) >= 2
    with pytest.raises(ValueError):
        ranker.run(query=query, documents=retrieved, top_k=0)
    # The pipeline serializes with the model's name.
    assert "GratingRanker" in pipe.dumps()
