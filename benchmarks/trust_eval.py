"""The committed evaluation of the trust flag on a real change of domain (``benchmarks/results/trust/``).

For each shipped phantom model and both methods of the flag (``latent``: version 1, the latent's Mahalanobis
distance; ``domain``: version 3, the block before the last, :mod:`lidc_cdam.models.domain_trust`): held-out
phantom crops (the test part of fold 0 of the phantoms the models were trained on) against crops of a
real chest CT (``tests/data/lung1``: its nodule and 240 random points in the lung and soft tissue), see
:mod:`lidc_cdam.evaluate.trust_shift`. Writes

* ``trust_eval.json``: AUROC and shares flagged per model and method, pooled rates, and the cost of the flag per
  point as a ratio to one forward pass (measured in the same run; machine-dependent, not compared by the test);
* ``trust_eval.md``: the same as a table; ``percentiles.csv``: every crop's percentile; ``histogram.png``;
* ``lidc_cdam/models/weights/TRUST_RATES.json``: the rates the report and the viewer quote (shipped).

    python benchmarks/trust_eval.py [--out benchmarks/results/trust] [--no-cost]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _timing import timed

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "data" / "lung1"
MODELS = ("phantom-malignancy", "phantom-biomarkers")


def evaluation(progress: bool = False) -> dict[str, Any]:
    """The deterministic part: rows per model and method, pooled rates and per-crop percentiles."""
    from lidc_cdam.pipelines.demo_lidc import demo_test_nodules, phantoms_of_patients

    from lidc_cdam.evaluate import trust_shift
    from lidc_cdam.models.demo_weights import load_shipped

    _, patients = demo_test_nodules(10**6)  # every fold-0 test nodule: only their scans' phantoms are rendered
    held_out = trust_shift.fold_crops(phantoms_of_patients(patients, progress), 0, "test")
    volume, label = trust_shift.read_fixture(FIXTURE / "lung1_thorax.nrrd", FIXTURE / "lung1_thorax_label.nrrd")
    real = trust_shift.real_ct_crops(volume, trust_shift.real_ct_points(volume, label))
    models = {name: load_shipped(name) for name in MODELS}
    summary, per_crop = trust_shift.evaluate_models(models, held_out, real)
    counts = {k: real.kinds.count(k) for k in dict.fromkeys(real.kinds)}
    return {"summary": summary, "pooled": trust_shift.pooled(summary), "per_crop": per_crop,
            "data": {"held_out": f"test part of fold 0 of the phantoms ({len(held_out.crops)} crops)",
                     "real_ct": f"tests/data/lung1 (pyradiomics 2.2.0 lung1): {counts}",
                     "goals": {"auroc": 0.95, "real_ct_flagged": 0.90, "in_domain_flagged": 0.05}}}


@torch.no_grad()
def cost(repeats: int = 50) -> dict[str, Any]:
    """Seconds per point of the flag vs one forward pass (batch 1, the central slice), per shipped model:
    ``from_pass`` (the features taken from the explainer's pass, as ``explain-ct`` does: Mahalanobis of 7
    slices and the percentile) and ``standalone`` (its own trunk pass over the 7 slices as well)."""
    from lidc_cdam.ct.inputs import CENTRE, model_inputs
    from lidc_cdam.models import domain_trust
    from lidc_cdam.models.demo_weights import load_shipped

    torch.manual_seed(0)
    crop = np.random.default_rng(0).uniform(-1000, 200, (32, 32, 32)).astype(np.float32)
    out = {}
    for name in MODELS:
        model = load_shipped(name)
        stats, input_stats = model.meta["trust"], model.meta["input_stats"]
        size = int(input_stats["image_size"])
        x1 = model_inputs(crop, "axial", [CENTRE], input_stats, size)
        x7 = domain_trust.crop_inputs(crop, "axial", input_stats, size)
        feats = domain_trust.input_features(model, x7)
        forward = timed(lambda m=model, x=x1: m(x), repeats)
        from_pass = timed(lambda s=stats, f=feats: domain_trust.crop_percentile(s, f), repeats)
        standalone = timed(lambda m=model, s=stats, x=x7: domain_trust.crop_percentile(
            s, domain_trust.input_features(m, x)), repeats)
        out[name] = {"forward_seconds": forward, "from_pass_seconds": from_pass, "standalone_seconds": standalone,
                     "from_pass_ratio": from_pass / forward, "standalone_ratio": standalone / forward}
    return {"per_model": out, "threads": torch.get_num_threads(), "repeats": repeats,
            "note": "median wall time; ratio = seconds of the flag per point / seconds of one forward pass "
                    "(batch 1, central slice) of the same model in the same run"}


def markdown(result: dict[str, Any]) -> str:
    lines = ["# The trust flag on a real change of domain", "",
             f"In domain: {result['data']['held_out']}. Out of domain: {result['data']['real_ct']}.",
             "Goals: AUROC >= 0.95, >= 90 % of real-CT crops flagged, <= 5 % of held-out crops flagged.", "",
             "| model | method | threshold | AUROC | real CT flagged | lung | soft tissue | held-out flagged | "
             "nodule percentile |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["summary"]:
        lines.append(f"| {r['model']} | {r['method']} | {r['threshold']:g} | {r['auroc']:.3f} | "
                     f"{100 * r['real_ct_flagged']:.1f} % | {100 * r['lung_flagged']:.1f} % | "
                     f"{100 * r['soft_tissue_flagged']:.1f} % | {100 * r['in_domain_flagged']:.1f} % | "
                     f"{r['nodule_percentile']:.1f} |")
    lines += ["", "Pooled over the models:", ""]
    for method, p in result["pooled"].items():
        lines.append(f"- {method}: flags {100 * p['in_domain_flagged']:.1f} % of held-out crops, "
                     f"{100 * p['real_ct_flagged']:.1f} % of real-CT crops; lowest AUROC {p['min_auroc']:.3f}")
    lines += ["", "Version 2 (one mean instead of two cluster means, one cross-fitting; the commit before version 3, "
              "on the models shipped before the phantoms rendered every biomarker's cause): "
              "phantom-malignancy AUROC 0.988, 97.9 % real CT flagged, 2.0 % held-out; phantom-biomarkers 0.976, "
              "81.3 %, 2.0 %."]
    if result.get("cost"):
        lines += ["", "Cost per point as a ratio to one forward pass (batch 1), same run:", ""]
        for name, c in result["cost"]["per_model"].items():
            lines.append(f"- {name}: {c['from_pass_ratio']:.3f} with the features of the explainer's pass, "
                         f"{c['standalone_ratio']:.2f} with its own trunk pass over 7 slices "
                         f"(forward {1e3 * c['forward_seconds']:.2f} ms)")
    return "\n".join(lines) + "\n"


def rates_file(result: dict[str, Any]) -> dict[str, Any]:
    """What ships as ``TRUST_RATES.json``: the rows and pooled rates, rounded."""
    def rnd(v: Any) -> Any:
        return round(v, 4) if isinstance(v, float) else v

    return {"source": "benchmarks/trust_eval.py (benchmarks/results/trust/)", "data": result["data"],
            "summary": [{k: rnd(v) for k, v in r.items()} for r in result["summary"]],
            "pooled": {m: {k: rnd(v) for k, v in p.items()} for m, p in result["pooled"].items()}}


def write(result: dict[str, Any], out: Path, rates: Path | None) -> None:
    import pandas as pd

    from lidc_cdam.evaluate.trust_shift import histogram_figure
    from lidc_cdam.io import write_json

    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "trust_eval.json", {k: v for k, v in result.items() if k != "per_crop"})
    pd.DataFrame(result["per_crop"]).to_csv(out / "percentiles.csv", index=False)
    (out / "trust_eval.md").write_text(markdown(result))
    histogram_figure(result["per_crop"], result["summary"], out / "histogram.png")
    if rates is not None:
        write_json(rates, rates_file(result))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "trust")
    parser.add_argument("--rates", type=Path, default=ROOT / "lidc_cdam" / "models" / "weights" / "TRUST_RATES.json")
    parser.add_argument("--no-cost", action="store_true", help="skip the timing (keeps the committed cost)")
    args = parser.parse_args(argv)
    result = evaluation()
    if not args.no_cost:
        result["cost"] = cost()
    elif (args.out / "trust_eval.json").exists():
        result["cost"] = json.loads((args.out / "trust_eval.json").read_text()).get("cost")
    write(result, args.out, args.rates)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
