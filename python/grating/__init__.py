"""grating: fast, memory-bounded top-K reranking with cross-encoders, in process.

The engine is the Rust crate ``grating`` (the same code as the ``grating`` CLI and server);
this package translates. :class:`Reranker` has the methods of sentence-transformers'
``CrossEncoder`` (``rank``, ``predict``) plus ``rerank`` (the full answer with the request's
statistics) and ``calibrate`` (fit the pruning rule on your own requests).

Framework adapters import their framework only when imported themselves:
``grating.langchain.GratingRerank`` (a LangChain ``BaseDocumentCompressor``),
``grating.llama_index.GratingRerank`` (a LlamaIndex ``BaseNodePostprocessor``) and
``grating.haystack.GratingRanker`` (a Haystack 2 component).

Example::

    from grating import Reranker
    reranker = Reranker("cross-encoder/ms-marco-MiniLM-L6-v2")
    reranker.rank("capital of France", ["Paris is the capital.", "Berlin has museums."], top_k=1)
    # [{'corpus_id': 0, 'score': 0.99...}]
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from . import _grating
from .errors import GratingError, InvalidRequestError

__version__: str = _grating.__version__

__all__ = [
    "Reranker",
    "RerankResult",
    "RankedDocument",
    "CalibrationResult",
    "GratingError",
    "InvalidRequestError",
    "parse_size",
    "__version__",
]

#: ``predict`` shows a progress bar by default (``show_progress_bar=None``) when tqdm is
#: installed, stderr is a terminal and the call has more pairs than this.
PROGRESS_BAR_MIN_PAIRS = 1024


def parse_size(size: str) -> int:
    """Bytes of a size written as the CLI's ``--max-memory`` takes it, e.g. ``"512MiB"``."""
    if not isinstance(size, str):
        raise TypeError(f"a size must be a str such as '512MiB', got {type(size).__name__}")
    return _grating.parse_size(size)


@dataclass(frozen=True)
class RankedDocument:
    """One document of a ranking.

    Attributes:
        corpus_id: index of the document in the list given.
        score: relevance score in 0-1 (see :meth:`Reranker.rank`).
        logit: the model's raw relevance logit.
        text: the document, when asked for.
    """

    corpus_id: int
    score: float
    logit: float
    text: Optional[str] = None


@dataclass(frozen=True)
class RerankResult:
    """A request's answer with its statistics (:meth:`Reranker.rerank`).

    Attributes:
        results: the top K (or every) document, best first.
        stats: the engine's per-request statistics, as ``grating rerank --json`` prints them
            under ``"stats"`` (mode, candidates, tokens, layers_per_candidate,
            candidate_layers_computed/full, saved_percent, prune_events, layer_timings,
            tokenize/compute/total seconds, peak_rss_mib, ...).
    """

    results: List[RankedDocument]
    stats: Dict[str, Any] = field(repr=False)

    @property
    def candidate_layers_computed(self) -> int:
        """Candidate-layers the request computed."""
        return int(self.stats["candidate_layers_computed"])

    @property
    def candidate_layers_full(self) -> int:
        """Candidate-layers full inference computes (every candidate through every layer)."""
        return int(self.stats["candidate_layers_full"])

    @property
    def saved_percent(self) -> float:
        """Percent of candidate-layers that pruning saved."""
        return float(self.stats["saved_percent"])

    @property
    def prune_events(self) -> List[Dict[str, Any]]:
        """Pruning decisions: after which layer, how many live, accepted and dropped."""
        return list(self.stats["prune_events"])

    @property
    def peak_rss_mib(self) -> float:
        """Peak resident memory of the process so far (VmHWM), MiB."""
        return float(self.stats["peak_rss_mib"])

    @property
    def total_seconds(self) -> float:
        """Wall time of the request, tokenization included."""
        return float(self.stats["total_seconds"])


@dataclass(frozen=True)
class CalibrationResult:
    """What :meth:`Reranker.calibrate` chose and measured.

    Attributes:
        config: the pruning rule chosen (margin rule: per-layer ``movement``, ``margin``).
        held_out: out-of-fold rows, one per (N, K): ``candidates`` (0: each request as it is),
            ``k``, ``requests``, mean ``agreement`` and ``min_agreement`` of the top K with full
            inference, and ``compute_share`` (candidate-layers computed / full).
        met: whether some margin reached the targets at every (N, K) (else the safest margin
            tried was kept).
        requests: requests used (those with more documents than the largest K).
        profile_path: where the profile was saved (``save=True``), else ``None``.
    """

    config: Dict[str, Any]
    held_out: List[Dict[str, Any]]
    met: bool
    requests: int
    profile_path: Optional[str]


def _check_text(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    return value


def _check_documents(documents: Any) -> List[str]:
    if isinstance(documents, (str, bytes)) or not hasattr(documents, "__iter__"):
        raise TypeError(f"documents must be a list of str, got {type(documents).__name__}")
    docs = list(documents)
    for i, d in enumerate(docs):
        if not isinstance(d, str):
            raise TypeError(f"documents[{i}] must be a str, got {type(d).__name__}")
    return docs


def _check_positive(name: str, value: Any, allow_none: bool = True) -> Optional[int]:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if value < 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return value


def _check_top_k(top_k: Any) -> Optional[int]:
    k = _check_positive("top_k", top_k)
    # top_k=0 goes to the engine, which refuses it with the CLI's message.
    return k


class _ProgressBar:
    """A tqdm bar driven from the engine's progress reports (finished pairs)."""

    def __init__(self, total: int, desc: str) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc=desc, unit="pair")

    def __call__(self, n: int) -> None:
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


def _want_progress(show: Optional[bool], total: int) -> bool:
    if show is None:
        if total <= PROGRESS_BAR_MIN_PAIRS or not sys.stderr.isatty():
            return False
        try:
            import tqdm  # noqa: F401
        except ImportError:
            return False
        return True
    if show:
        try:
            import tqdm  # noqa: F401
        except ImportError as e:
            raise ImportError(
                "show_progress_bar=True needs tqdm: pip install tqdm (or grating[progress])"
            ) from e
    return bool(show)


class Reranker:
    """A cross-encoder reranker loaded once and called many times.

    Args:
        model: a local Hugging Face directory (config.json, model.safetensors,
            tokenizer.json) or a hub id, as the CLI's ``--model``.
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` (CUDA needs a CUDA build).
        weights: ``"resident"`` (every layer loaded at start), ``"stream"`` (two layers
            resident, the next read while the current one computes) or ``"auto"``
            (resident when it fits ``max_memory``, else stream).
        max_memory: peak memory budget, bytes (int) or a size such as ``"512MiB"``: picks the
            weights mode, the chunk size and hidden-state offload so the peak stays under it,
            or refuses a request naming the minimum needed. Under a budget, requests run one
            at a time (see Concurrency).
        threads: compute threads (process-wide; default: all cores, as the CLI).
        dtype: ``"f32"``, ``"f16"`` or ``"bf16"`` (default: f32 on the CPU, bf16 on a GPU).
        profile_dir: where calibrated pruning profiles are read and saved (default: the
            user's cache directory, ``grating/profiles``; ``GRATING_PROFILE_DIR`` as for the
            CLI).
        max_length: most tokens of one (query, document) sequence (default: the model's).
        batch_size: candidates per batch of full inference (``predict``; default 32 on CPU).
        chunk_tokens: tokens per chunk of the layer-major pass (default: 4096 on CPU).
        offload: offload hidden states of chunks not being computed to a scratch file.
        spill_dir: where offloaded hidden states go (default: the temporary directory).
        embedding_cache: streaming only: share of the vocabulary the embedding cache keeps.
        shared: run ``rank``/``rerank`` calls through one shared layer pass (default), as
            ``grating serve`` does.

    Concurrency:
        Every method releases the GIL while the engine computes, and a ``Reranker`` may be
        called from many Python threads at once. ``rank`` and ``rerank`` join one shared,
        layer-major pass (the library's ``SharedReranker``, as the server runs): concurrent
        requests share each layer's weights and each still gets exactly the answer it gets
        alone. With ``max_memory`` set (or ``shared=False``) requests run through the
        budget-planned single-request path, one at a time, so the budget holds. ``predict``
        (full inference) runs on the calling thread.
    """

    def __init__(
        self,
        model: Union[str, "os.PathLike[str]"],
        device: str = "cpu",
        weights: str = "auto",
        max_memory: Union[int, str, None] = None,
        threads: Optional[int] = None,
        dtype: Optional[str] = None,
        profile_dir: Union[str, "os.PathLike[str]", None] = None,
        *,
        max_length: Optional[int] = None,
        batch_size: Optional[int] = None,
        chunk_tokens: Optional[int] = None,
        offload: bool = False,
        spill_dir: Union[str, "os.PathLike[str]", None] = None,
        embedding_cache: float = 0.1,
        shared: bool = True,
    ) -> None:
        model = os.fspath(model)
        _check_text("model", model)
        _check_text("device", device)
        _check_text("weights", weights)
        if dtype is not None:
            _check_text("dtype", dtype)
        if isinstance(max_memory, str):
            max_memory = parse_size(max_memory)
        elif max_memory is not None:
            max_memory = _check_positive("max_memory", max_memory)
        threads = _check_positive("threads", threads)
        if profile_dir is None:
            profile_dir = os.environ.get("GRATING_PROFILE_DIR") or None
        if spill_dir is None:
            spill_dir = os.environ.get("GRATING_SPILL_DIR") or None
        self.max_length = _check_positive("max_length", max_length)
        self._native = _grating.NativeReranker(
            model,
            device=device,
            weights=weights,
            max_memory=max_memory,
            threads=threads,
            dtype=dtype,
            profile_dir=os.fspath(profile_dir) if profile_dir is not None else None,
            batch_size=_check_positive("batch_size", batch_size),
            chunk_tokens=_check_positive("chunk_tokens", chunk_tokens),
            offload=bool(offload),
            spill_dir=os.fspath(spill_dir) if spill_dir is not None else None,
            embedding_cache=float(embedding_cache),
            shared=bool(shared),
        )

    # -- facts -------------------------------------------------------------------------------

    @property
    def model(self) -> str:
        """The model as named when loading (a directory or a hub id)."""
        return self._native.model_id

    @property
    def device(self) -> str:
        return self._native.device

    @property
    def weights(self) -> str:
        """Where the layers live: ``"resident"`` or ``"stream"`` (``auto`` resolved)."""
        return self._native.weights

    @property
    def profile_dir(self) -> str:
        """Where the model's pruning and score profiles are read and saved."""
        return self._native.profile_dir

    @property
    def shared(self) -> bool:
        """Whether ``rank``/``rerank`` calls share one layer pass."""
        return self._native.shared

    @property
    def info(self) -> Dict[str, Any]:
        """The model's shape facts: architecture, num_layers, hidden_size, max_length, ..."""
        return json.loads(self._native.info_json())

    @property
    def prune_config(self) -> Dict[str, Any]:
        """The pruning rule requests use now (the model's profile, or what ``calibrate``
        applied)."""
        return json.loads(self._native.prune_json())

    @property
    def score_calibrated(self) -> bool:
        """Whether scores are the model's fitted probability of relevance (else sigmoid)."""
        return self._native.score_calibrated

    def relevance(self, logit: float) -> float:
        """The 0-1 relevance score of a logit: the model's calibration when it has one (a
        probability of relevance fitted on judged data), else the sigmoid. Monotone."""
        return self._native.relevance(float(logit))

    def __repr__(self) -> str:
        return f"Reranker(model={self.model!r}, device={self.device!r}, weights={self.weights!r})"

    # -- requests ----------------------------------------------------------------------------

    def _rerank(
        self, query: Any, documents: Any, top_k: Any, exact: bool
    ) -> Tuple[List[str], List[Tuple[int, float, float]], str]:
        query = _check_text("query", query)
        docs = _check_documents(documents)
        k = _check_top_k(top_k)
        rows, stats = self._native.rerank(
            query, docs, top_k=k, exact=bool(exact), max_length=self.max_length
        )
        return docs, rows, stats

    def rank(
        self,
        query: str,
        documents: Sequence[str],
        top_k: Optional[int] = None,
        return_documents: bool = False,
        exact: bool = False,
    ) -> List[Dict[str, Any]]:
        """Ranks ``documents`` for ``query``, as sentence-transformers' ``CrossEncoder.rank``.

        Args:
            query: the query.
            documents: the candidates.
            top_k: return the K best (default: all, which also means nothing is pruned).
            return_documents: add each document's ``text``.
            exact: no pruning: the top K and scores of full inference.

        Returns:
            ``[{"corpus_id": int, "score": float, "text"?: str}, ...]``, best first in the
            engine's order (the CLI's: documents accepted early first, see below). ``score``
            is the relevance score the CLI (``score``) and the server (``relevance_score``)
            report: the model's calibrated probability of relevance when its profile has one,
            else the sigmoid of the logit (what ``CrossEncoder`` returns for one-label models).
            It is monotone in the logit, so the order is the logits' order. With pruning (the
            default when ``top_k`` is below the number of documents) a document accepted into
            the top K before the last layer keeps the score of the layer that accepted it, as
            in the CLI; ``exact=True`` gives every returned document its final score.

        Raises:
            ValueError: (``InvalidRequestError``) an empty query or document list, ``top_k=0``.
            TypeError: arguments of the wrong type.
            GratingError: an engine failure.
        """
        docs, rows, _ = self._rerank(query, documents, top_k, exact)
        out = []
        for index, _logit, score in rows:
            d: Dict[str, Any] = {"corpus_id": index, "score": score}
            if return_documents:
                d["text"] = docs[index]
            out.append(d)
        return out

    def rerank(
        self,
        query: str,
        documents: Sequence[str],
        top_k: Optional[int] = None,
        exact: bool = False,
        return_documents: bool = False,
    ) -> RerankResult:
        """The full answer of :meth:`rank` with the request's statistics (candidate-layers
        computed, pruning events, timings, peak memory)."""
        docs, rows, stats = self._rerank(query, documents, top_k, exact)
        results = [
            RankedDocument(
                corpus_id=index,
                score=score,
                logit=logit,
                text=docs[index] if return_documents else None,
            )
            for index, logit, score in rows
        ]
        return RerankResult(results=results, stats=json.loads(stats))

    def predict(
        self,
        sentences: Union[Sequence[Sequence[str]], Tuple[str, str]],
        batch_size: int = 32,
        show_progress_bar: Optional[bool] = None,
        activation: Union[bool, Callable[[np.ndarray], np.ndarray]] = True,
        convert_to_numpy: bool = True,
    ) -> Union[np.ndarray, np.float32, List[float]]:
        """Scores every (query, document) pair by full inference, as ``CrossEncoder.predict``.

        Pairs are grouped by query (one engine request per distinct query); every pair gets
        its exact score, in the order given.

        Args:
            sentences: ``[(query, document), ...]``, or one pair (then one score returns).
            batch_size: candidates per full-inference batch.
            show_progress_bar: a tqdm bar (default: when tqdm is installed, stderr is a
                terminal and there are more than ``PROGRESS_BAR_MIN_PAIRS`` pairs).
            activation: ``True``: the relevance score (as :meth:`rank`'s ``score``);
                ``False``: raw logits; a callable: applied to the logits array.
            convert_to_numpy: return a NumPy float32 array (else a list of floats).
        """
        single = (
            isinstance(sentences, (tuple, list))
            and len(sentences) == 2
            and all(isinstance(s, str) for s in sentences)
        )
        pairs_in = [sentences] if single else sentences
        if isinstance(pairs_in, (str, bytes)) or not hasattr(pairs_in, "__iter__"):
            raise TypeError(
                f"sentences must be a list of (query, document) pairs, got {type(sentences).__name__}"
            )
        pairs: List[Tuple[str, str]] = []
        for i, p in enumerate(pairs_in):
            if (
                not isinstance(p, (tuple, list))
                or len(p) != 2
                or not isinstance(p[0], str)
                or not isinstance(p[1], str)
            ):
                raise TypeError(f"sentences[{i}] must be a (query, document) pair of str")
            pairs.append((p[0], p[1]))
        # batch_size=0 goes to the engine, which refuses it with the CLI's message.
        bs = _check_positive("batch_size", batch_size, allow_none=False)
        if not pairs:
            empty = np.zeros(0, dtype=np.float32)
            return empty if convert_to_numpy else []
        bar = _ProgressBar(len(pairs), "predict") if _want_progress(show_progress_bar, len(pairs)) else None
        try:
            logits = self._native.predict(
                pairs,
                batch_size=bs,
                max_length=self.max_length,
                relevance=activation is True,
                progress=bar,
            )
        finally:
            if bar is not None:
                bar.close()
        scores = np.asarray(logits, dtype=np.float32)
        if callable(activation):
            scores = np.asarray(activation(scores), dtype=np.float32)
        if single:
            return scores[0]
        return scores if convert_to_numpy else scores.tolist()

    def calibrate(
        self,
        requests: Sequence[Tuple[str, Sequence[str]]],
        target_agreement: float = 0.99,
        top_k: Sequence[int] = (1, 5, 10),
        folds: int = 5,
        *,
        min_agreement: float = 0.9,
        sizes: Optional[Sequence[int]] = None,
        save: bool = False,
        apply: bool = True,
        show_progress_bar: Optional[bool] = None,
    ) -> CalibrationResult:
        """Fits the pruning rule (the margin rule) on your requests, as ``grating calibrate``
        does on a jsonl of requests: each request runs once without pruning while every
        layer's scores are recorded, then the smallest margin whose out-of-fold (folds by
        query) mean top-K agreement with full inference reaches ``target_agreement`` and
        whose per-request minimum reaches ``min_agreement``, at every K, is chosen.

        Args:
            requests: ``[(query, [document, ...]), ...]``; those with no more documents than
                the largest K are left out. No relevance judgments are needed.
            target_agreement: mean top-K agreement with full inference to reach, out of fold.
            top_k: the K values the rule must serve.
            folds: folds (by query) of the out-of-fold report (at least 2).
            min_agreement: lowest per-request agreement allowed, out of fold.
            sizes: candidates per request to measure at (each request cut to its first N);
                default: each request as it is.
            save: write the model's pruning profile to :attr:`profile_dir` (later loads use it).
            apply: make this reranker's later ``rank``/``rerank`` calls use the rule.
            show_progress_bar: a tqdm bar over the recorded requests.
        """
        if isinstance(requests, (str, bytes)) or not hasattr(requests, "__iter__"):
            raise TypeError("requests must be a list of (query, documents) pairs")
        reqs: List[Tuple[str, List[str]]] = []
        for i, r in enumerate(requests):
            if not isinstance(r, (tuple, list)) or len(r) != 2:
                raise TypeError(f"requests[{i}] must be a (query, documents) pair")
            reqs.append((_check_text(f"requests[{i}] query", r[0]), _check_documents(r[1])))
        ks = [_check_positive("top_k", k, allow_none=False) for k in top_k]
        size_list = [_check_positive("sizes", n, allow_none=False) for n in (sizes or [])]
        folds = _check_positive("folds", folds, allow_none=False)
        for name, v in (("target_agreement", target_agreement), ("min_agreement", min_agreement)):
            if not isinstance(v, (int, float)) or isinstance(v, bool) or math.isnan(v):
                raise TypeError(f"{name} must be a number")
        bar = _ProgressBar(len(reqs), "recording") if _want_progress(show_progress_bar, len(reqs) * 64) else None
        try:
            report = self._native.calibrate(
                reqs,
                target_agreement=float(target_agreement),
                min_agreement=float(min_agreement),
                top_k=ks,
                sizes=size_list,
                folds=folds,
                save=bool(save),
                apply=bool(apply),
                progress=bar,
            )
        finally:
            if bar is not None:
                bar.close()
        r = json.loads(report)
        return CalibrationResult(
            config=r["config"],
            held_out=r["held_out"],
            met=bool(r["met"]),
            requests=int(r["requests"]),
            profile_path=r["profile_path"],
        )
