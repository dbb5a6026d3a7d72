"""Building the model to fine-tune: a timm ViT backbone (local weights) or a new MONAI ViT (2D / 3D), a linear head
on CLS' for the task, and which parameters train (the last N blocks, or the authors' last N tensors)."""

from __future__ import annotations

from typing import Any

import torch

from lidc_cdam.models.backbones import adapter_for
from lidc_cdam.models.heads import LinearHead
from lidc_cdam.models.loading import build_backbone, from_timm, load_model
from lidc_cdam.models.vit import ViTModel
from lidc_cdam.train.config import TrainConfig
from lidc_cdam.train.mimetic_init import mimetic_init_


def build_model(config: TrainConfig, output_names: list[str], meta: dict[str, Any] | None = None) -> ViTModel:
    """The backbone of ``config.backbone`` with a fresh :class:`LinearHead` for ``output_names``."""
    spec = config.backbone
    task = "classification" if config.task == "malignancy" else "regression"
    if spec.monai_kwargs:
        build = {"family": "monai", "monai_kwargs": {"in_channels": 1, **spec.monai_kwargs, "classification": True,
                                                     "dropout_rate": spec.drop_rate}}
        backbone = build_backbone(build)
        head = LinearHead(adapter_for(backbone).embed_dim, len(output_names), config.head_dropout)
        return ViTModel(backbone, head, task=task, output_names=output_names, build=build, meta=meta)
    # timm's own drop_rate is the classifier's dropout (replaced here by the head's): the backbone's
    # dropout is on the token embeddings and the attention / MLP projections
    kwargs = {**spec.timm_kwargs, "pos_drop_rate": spec.drop_rate, "proj_drop_rate": spec.drop_rate,
              "drop_path_rate": spec.drop_path_rate}
    if spec.name is None and spec.checkpoint:  # architecture read from the file
        loaded = load_model(spec.checkpoint, **kwargs)
        backbone, build = loaded.backbone, loaded.build
        backbone.reset_classifier(0)
    elif spec.name is None:
        build = {"timm_name": None, "timm_kwargs": {**kwargs, "num_classes": 0}}
        backbone = build_backbone(build)
    else:
        loaded = from_timm(spec.name, pretrained=spec.pretrained, checkpoint=spec.checkpoint,
                           **{**kwargs, "num_classes": 0})
        backbone, build = loaded.backbone, loaded.build
    if spec.init == "mimetic":
        mimetic_init_(backbone.blocks, seed=config.seed)
    head = LinearHead(backbone.embed_dim, len(output_names), config.head_dropout)
    return ViTModel(backbone, head, task=task, output_names=output_names, build=build, meta=meta)


def set_trainable(model: ViTModel, config: TrainConfig) -> list[torch.nn.Parameter]:
    """Freeze what the config does not fine-tune; return the trainable parameters.

    ``trainable_blocks = N``: the last N transformer blocks, the final norm and the head;
    ``trainable_last_params = N``: the last N parameter tensors in registration order (how the
    authors counted "trainable layers"); neither: everything. Parameters the forward pass never uses
    (``BackboneAdapter.unused_parameters``, e.g. MONAI's ``norm_cross_attn``) are always frozen and not
    counted: DDP's default settings fail at the second iteration on trainable parameters without gradients.
    """
    unused = {f"backbone.{n}" for n in model.adapter.unused_parameters()}
    for name, p in model.named_parameters():
        if name in unused:
            p.requires_grad_(False)
    named = [(n, p) for n, p in model.named_parameters() if n not in unused]
    if config.trainable_blocks is not None:
        depth = len(model.backbone.blocks)
        first = depth - config.trainable_blocks
        keep = {f"backbone.blocks.{i}." for i in range(max(first, 0), depth)} | {"backbone.norm.", "head."}
        trainable = {n for n, _ in named if any(n.startswith(k) for k in keep)}
    elif config.trainable_last_params is not None:
        trainable = {n for n, _ in named[len(named) - config.trainable_last_params:]}
    else:
        trainable = {n for n, _ in named}
    params = []
    for name, p in named:
        p.requires_grad_(name in trainable)
        if name in trainable:
            params.append(p)
    return params
