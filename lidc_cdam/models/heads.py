"""Heads on the ViT latent ``l`` (CLS'): a linear classifier or regressor, as in the paper."""

from __future__ import annotations

from typing import Any

from torch import nn


class LinearHead(nn.Sequential):
    """Dropout then ``Linear(in_features, out_features)`` on the latent.

    Used for the ImageNet linear probe (1000 logits), malignancy (1 logit) and the eight
    biomarkers (8 regression outputs).
    """

    def __init__(self, in_features: int, out_features: int, dropout: float = 0.0) -> None:
        super().__init__(nn.Dropout(dropout), nn.Linear(in_features, out_features))
        self.in_features = in_features
        self.out_features = out_features
        self.dropout = dropout

    def config(self) -> dict[str, Any]:
        """What :func:`build_head` needs to rebuild this head."""
        return {"type": "linear", "in_features": self.in_features, "out_features": self.out_features,
                "dropout": self.dropout}


def build_head(config: dict[str, Any] | None) -> nn.Module | None:
    """Rebuild a head from :meth:`LinearHead.config`; ``None`` means the backbone's own timm head."""
    if config is None:
        return None
    if config.get("type") != "linear":
        raise ValueError(f"unknown head type {config.get('type')!r} in checkpoint")
    return LinearHead(int(config["in_features"]), int(config["out_features"]), float(config.get("dropout", 0.0)))
