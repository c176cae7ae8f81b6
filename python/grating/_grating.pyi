"""Type stubs of the native module (the Rust half of the package; see src/lib.rs)."""

from typing import Callable, List, Optional, Sequence, Tuple

__version__: str

def parse_size(s: str) -> int: ...

class NativeReranker:
    def __init__(
        self,
        model: str,
        device: str = "cpu",
        weights: str = "auto",
        max_memory: Optional[int] = None,
        threads: Optional[int] = None,
        dtype: Optional[str] = None,
        profile_dir: Optional[str] = None,
        batch_size: Optional[int] = None,
        chunk_tokens: Optional[int] = None,
        offload: bool = False,
        spill_dir: Optional[str] = None,
        embedding_cache: float = 0.1,
        shared: bool = True,
    ) -> None: ...
    def rerank(
        self,
        query: str,
        documents: Sequence[str],
        top_k: Optional[int] = None,
        exact: bool = False,
        max_length: Optional[int] = None,
        truncation: str = "right",
        instruction: Optional[str] = None,
    ) -> Tuple[List[Tuple[int, float, float]], str]: ...
    def predict(
        self,
        pairs: Sequence[Tuple[str, str]],
        batch_size: Optional[int] = None,
        max_length: Optional[int] = None,
        truncation: str = "right",
        instruction: Optional[str] = None,
        relevance: bool = False,
        progress: Optional[Callable[[int], object]] = None,
    ) -> List[float]: ...
    def calibrate(
        self,
        requests: Sequence[Tuple[str, Sequence[str]]],
        target_agreement: float = 0.99,
        min_agreement: float = 0.9,
        top_k: Sequence[int] = ...,
        sizes: Sequence[int] = ...,
        folds: int = 5,
        save: bool = False,
        apply: bool = True,
        progress: Optional[Callable[[int], object]] = None,
    ) -> str: ...
    def relevance(self, logit: float) -> float: ...
    def info_json(self) -> str: ...
    def prune_json(self) -> str: ...
    @property
    def score_calibrated(self) -> bool: ...
    @property
    def model_id(self) -> str: ...
    @property
    def device(self) -> str: ...
    @property
    def weights(self) -> str: ...
    @property
    def profile_dir(self) -> str: ...
    @property
    def shared(self) -> bool: ...
