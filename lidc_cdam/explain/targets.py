"""What an explanation is about: head outputs (class logits, regression outputs) or concepts.

A target turns the latent ``l`` and head outputs into the scalar ``F`` whose gradient CDAM takes:
a raw logit or regression output (Eq. 2), or a similarity ``g(l, l_c)`` to a concept vector (Eq. 4).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

Similarity = Literal["dot", "cosine", "neg_l2"]
SIMILARITIES: tuple[str, ...] = ("dot", "cosine", "neg_l2")


class TargetError(ValueError):
    """A target that does not exist for this model (index out of range, unknown name...)."""


@dataclass(frozen=True)
class Concept:
    """A latent concept ``l_c``: the plain mean latent of example images (Eq. 3).

    ``similarity`` is ``g`` of Eq. 4: ``dot`` (the paper's), ``cosine`` or ``neg_l2``
    (negative Euclidean distance, so larger is more similar).
    """

    vector: torch.Tensor  # [D]
    similarity: Similarity = "dot"
    name: str = "concept"

    def __post_init__(self) -> None:
        if self.similarity not in SIMILARITIES:
            raise TargetError(f"unknown similarity {self.similarity!r}; choose from {SIMILARITIES}")
        if self.vector.ndim != 1:
            raise TargetError(f"a concept vector is 1-D, got shape {tuple(self.vector.shape)}")

    @classmethod
    @torch.no_grad()
    def from_images(
        cls,
        model,
        images: torch.Tensor,
        *,
        similarity: Similarity = "dot",
        name: str = "concept",
        batch_size: int = 32,
    ) -> Concept:
        """Mean latent (CLS' for token-pooling models) of ``images`` ``[n, C, H, W]`` (``[n, C, D, H, W]`` for a
        3D model) (Eq. 3)."""
        dims = 2 + len(model.patch_size) if hasattr(model, "patch_size") else 4
        if images.ndim != dims or images.shape[0] == 0:
            axes = "H, W" if dims == 4 else "D, H, W"
            raise TargetError(f"concept images must be a non-empty [n, C, {axes}] tensor, got {tuple(images.shape)}")
        latents = [model.latent(chunk) for chunk in images.split(batch_size)]
        return cls(torch.cat(latents).mean(0), similarity=similarity, name=name)

    def score(self, latent: torch.Tensor) -> torch.Tensor:
        """``g(l, l_c)`` for latents ``[..., D]``."""
        c = self.vector.to(latent)
        if self.similarity == "dot":
            return latent @ c
        if self.similarity == "cosine":
            return F.cosine_similarity(latent, c.expand_as(latent), dim=-1)
        return -(latent - c).norm(dim=-1)


@dataclass(frozen=True)
class TargetSpec:
    """Resolved targets for a batch: ``K`` targets per image.

    Either ``indices`` ``[B, K]`` into the head outputs, or ``concepts`` (K of them, shared by all
    images). ``names`` labels the K columns (a per-image list when indices differ per image).
    """

    indices: torch.Tensor | None
    concepts: tuple[Concept, ...] | None
    names: list[list[str]]

    @property
    def num_targets(self) -> int:
        return len(self.concepts) if self.concepts is not None else int(self.indices.shape[1])

    def subset(self, rows: slice) -> TargetSpec:
        """The same targets for a slice of the images."""
        indices = self.indices[rows] if self.indices is not None else None
        return TargetSpec(indices, self.concepts, self.names[rows])

    def objective(self, model, latent: torch.Tensor) -> torch.Tensor:
        """``F`` for latents ``[B, K, ..., D]`` where copy ``[b, k]`` explains target ``k`` of image ``b``.

        Returns ``[B, K, ...]``.
        """
        if self.concepts is not None:
            return torch.stack([c.score(latent[:, k]) for k, c in enumerate(self.concepts)], dim=1)
        outputs = model.head(latent)  # [B, K, ..., C]
        idx = self.indices.to(outputs.device)
        idx = idx.reshape(*idx.shape, *([1] * (outputs.ndim - 2)))
        return outputs.gather(-1, idx.expand(*outputs.shape[:-1], 1)).squeeze(-1)


def _is_list(value) -> bool:
    return isinstance(value, Sequence | torch.Tensor) and not isinstance(value, str)


def resolve_targets(model, targets, batch_size: int) -> TargetSpec:
    """Normalise the ``targets`` argument of :func:`lidc_cdam.explain`.

    Accepted: an int or output name; a list of them (same for every image); a per-image list of
    lists or a ``[B, K]`` / ``[B]`` tensor; a :class:`Concept` or a list of concepts.
    """
    if isinstance(targets, Concept):
        targets = [targets]
    if isinstance(targets, Sequence) and targets and all(isinstance(t, Concept) for t in targets):
        dims = {t.vector.shape[0] for t in targets}
        if dims != {model.embed_dim}:
            raise TargetError(
                f"concept vectors have dimension {sorted(dims)}, the model's latent has {model.embed_dim}"
            )
        return TargetSpec(None, tuple(targets), [[c.name for c in targets]] * batch_size)

    n_out = model.num_outputs
    if n_out == 0:
        raise TargetError("this model has no head (feature extractor): explain a Concept instead")
    names = model.output_names

    def to_index(t) -> int:
        if isinstance(t, Concept):
            raise TargetError("mixing concepts with output indices in one call is not supported")
        if isinstance(t, str):
            if names is None or t not in names:
                known = f"; known names: {names}" if names else " (the model has no output names)"
                raise TargetError(f"unknown target name {t!r}{known}")
            return names.index(t)
        i = int(t)
        if not 0 <= i < n_out:
            raise TargetError(f"target index {i} is out of range: the model has {n_out} outputs (0..{n_out - 1})")
        return i

    if isinstance(targets, torch.Tensor):
        if targets.ndim == 0:
            rows = [[targets.item()]] * batch_size
        elif targets.ndim in (1, 2) and targets.shape[0] == batch_size:
            rows = targets.reshape(batch_size, -1).tolist()
        else:
            raise TargetError(
                f"a target tensor is read per image: [B] or [B, K] with B={batch_size}, got "
                f"{tuple(targets.shape)} (pass a list for the same targets on every image)"
            )
    elif isinstance(targets, int | str):
        rows = [[targets]] * batch_size
    elif isinstance(targets, Sequence) and targets and all(_is_list(t) for t in targets):
        if len(targets) != batch_size:
            raise TargetError(f"per-image targets: got {len(targets)} lists for {batch_size} images")
        rows = [list(t) for t in targets]
    elif isinstance(targets, Sequence) and targets:
        rows = [list(targets)] * batch_size
    else:
        raise TargetError(f"cannot interpret targets={targets!r}")

    if len({len(r) for r in rows}) != 1 or not rows[0]:
        raise TargetError("every image needs the same, non-zero number of targets")
    index = torch.tensor([[to_index(t) for t in row] for row in rows], dtype=torch.long)
    label = (lambda i: names[i]) if names else str
    return TargetSpec(index, None, [[label(i) for i in row] for row in index.tolist()])
