#!/usr/bin/env bash
# GPU check of lidc-cdam in one script, about 3 minutes of an H200 expected, every part capped so that
# the whole run stays under 8 minutes (see benchmarks/README.md, "GPU check"):
#
#   cdam_fp32, cdam_bf16   benchmarks/bench_cdam.py on CUDA, float32 / bf16 autocast: CDAM, Smooth and
#                          Integrated CDAM as multiples of one forward pass, ViT-S/16 and ViT-S/8, 224 px
#   evaluate_fp32/_bf16    benchmarks/bench_evaluate.py at the paper's size: random ViT-S/8, 224 px, the
#                          paper-imagenet preset's ten methods and options, 27 box sizes x 100 boxes,
#                          20 perturbation levels, scikit-image's photographs where it is installed, else
#                          generated two-digit images; images per minute and the ratio of the metrics'
#                          time to the forward-pass lower bound (bf16: timing only)
#   runner                 benchmarks/bench_runner.py: the real `lidc-cdam benchmark` runner at the same
#                          size on RUNNER_IMAGES (4) X_multi-like two-digit images: images per minute
#   train                  benchmarks/train_step.py: the training engine's own step (TrainStep), ViT-S/16,
#                          batch 64, 224 px, bf16 autocast (and float32 beside it), warm-up excluded
#
# Each part runs under `timeout` with its own limit, writes <part>.json and <part>.txt, and the run
# ends with summary.json / summary.txt (GPU name, torch and CUDA versions, one line per part) in
# benchmarks/results/gpu/ (or --results DIR).
#
#   bash benchmarks/device_check.sh                  # on the GPU machine (a copy of the repo)
#   bash benchmarks/device_check.sh --archive "$OUT/gpu.tgz"   # also pack the results into one file
#   bash benchmarks/device_check.sh --smoke          # every part tiny, on the CPU, into a temp folder
#   SMOKE=1 DEVICE=cpu bash benchmarks/device_check.sh   # the same
#   bash benchmarks/device_check.sh --smoke --device cuda  # tiny sizes on the GPU: checks the CUDA paths in ~1 min
#   bash benchmarks/device_check.sh --setup-only     # only find / make the Python environment
#
# Options (or environment variables): --smoke (SMOKE=1); --device DEV (DEVICE; default cuda, cpu when
# smoke); --results DIR (RESULTS_DIR; default benchmarks/results/gpu, a new temp folder when smoke);
# --python PY (PYTHON: that interpreter, no setup); --images N (EVAL_IMAGES, default 5); --archive FILE
# (a .tgz of the results folder at the end). Part limits in seconds: T_CDAM (60 each), T_EVAL (120),
# T_EVAL_BF16 (60), T_RUNNER (90), T_TRAIN (60): 7.5 minutes if every part ran to its limit; T_SETUP (420)
# for pip. RUNNER_IMAGES (4): the runner part's images.
#
# Python, first that works: $PYTHON; .venv/bin/python (when .venv exists but lidc_cdam does not import
# from it, the script says how to install and stops); python3 with PYTHONPATH=<repo> when torch, timm
# and lidc_cdam's few needs are already installed (the GPU image: no install, nothing to download);
# else, .venv being absent, it makes one (`python3 -m venv --system-site-packages .venv`, reusing an
# installed torch) and runs `.venv/bin/pip install -e . -q`, printing both commands; without an index it
# falls back to `pip install -e . --no-deps --no-build-isolation` (the machine's setuptools, nothing
# downloaded), then to the source tree on PYTHONPATH. scikit-image is never needed.
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
cd "$repo" || exit 2

SMOKE=${SMOKE:-0}
DEVICE=${DEVICE:-}
RESULTS=${RESULTS_DIR:-}
PYTHON=${PYTHON:-}
EVAL_IMAGES=${EVAL_IMAGES:-5}
RUNNER_IMAGES=${RUNNER_IMAGES:-4}
ARCHIVE=
SETUP_ONLY=0
while [ $# -gt 0 ]; do
    case "$1" in
        --smoke) SMOKE=1 ;;
        --device) DEVICE=$2; shift ;;
        --results) RESULTS=$2; shift ;;
        --python) PYTHON=$2; shift ;;
        --images) EVAL_IMAGES=$2; shift ;;
        --archive) ARCHIVE=$2; shift ;;
        --setup-only) SETUP_ONLY=1 ;;
        -h|--help) sed -n '2,/^set -uo/p' "$here/$(basename "${BASH_SOURCE[0]}")" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "device_check: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
if [ "$SMOKE" = 1 ]; then
    DEVICE=${DEVICE:-cpu}
    RESULTS=${RESULTS:-$(mktemp -d "${TMPDIR:-/tmp}/device_check.XXXXXX")}
    T_CDAM=${T_CDAM:-150}; T_EVAL=${T_EVAL:-150}; T_EVAL_BF16=${T_EVAL_BF16:-150}; T_TRAIN=${T_TRAIN:-150}
    T_RUNNER=${T_RUNNER:-150}
else
    DEVICE=${DEVICE:-cuda}
    RESULTS=${RESULTS:-$repo/benchmarks/results/gpu}
    T_CDAM=${T_CDAM:-60}; T_EVAL=${T_EVAL:-120}; T_EVAL_BF16=${T_EVAL_BF16:-60}; T_TRAIN=${T_TRAIN:-60}
    T_RUNNER=${T_RUNNER:-90}
fi
T_SETUP=${T_SETUP:-420}
mkdir -p "$RESULTS" || exit 2
RESULTS=$(cd "$RESULTS" && pwd)
# CPU threads: 1 in the smoke run (two spinning OpenMP threads on a shared 2-core machine run 20-50x
# slower), else up to 8 (the GPU parts use the CPU only for box masks and bookkeeping)
THREADS=$(nproc 2>/dev/null || echo 2)
[ "$THREADS" -gt 8 ] && THREADS=8
[ "$SMOKE" = 1 ] && THREADS=1
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg

# `timeout` from coreutils; without it the parts run unlimited (said once)
if command -v timeout >/dev/null 2>&1; then
    limit() { local s=$1; shift; timeout --kill-after=10 "$s" "$@"; }
else
    echo "device_check: no 'timeout' command here: the parts run without their time limits"
    limit() { shift; "$@"; }
fi

# ---------------------------------------------------------------- Python environment
install_hint() {
    cat <<EOF
device_check: lidc_cdam (with torch and timm) does not import with $1.
  Install the project into it:             $1 -m pip install -e .
  Or let this script make a new .venv:     rm -rf .venv && bash benchmarks/device_check.sh --setup-only
  Or name an interpreter that has torch:   PYTHON=/path/to/python bash benchmarks/device_check.sh
EOF
}

# prints "torch-version cuda-version cuda-available" when lidc_cdam, timm and torch import
probe() {
    "$1" -c "import lidc_cdam, timm, torch; print(torch.__version__, torch.version.cuda, torch.cuda.is_available())" \
        2>/dev/null | tail -n 1
}

info=
if [ -n "$PYTHON" ]; then
    PY=$PYTHON
    info=$(probe "$PY")
elif [ -x .venv/bin/python ]; then
    PY=$repo/.venv/bin/python
    info=$(probe "$PY")
else
    PY=$(command -v python3 || command -v python || true)
    [ -n "$PY" ] || { echo "device_check: no python3 on PATH"; exit 2; }
    info=$(PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" probe "$PY")
    if [ -n "$info" ]; then
        export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
        echo "device_check: no .venv; $PY has torch and timm: using it with PYTHONPATH=$repo (nothing installed)"
    else
        echo "device_check: no .venv, and $PY cannot import lidc_cdam + timm + torch: making .venv" \
             "(log: $RESULTS/setup.log)"
        echo "+ $PY -m venv --system-site-packages .venv"
        "$PY" -m venv --system-site-packages .venv || { echo "device_check: venv creation failed"; exit 2; }
        PY=$repo/.venv/bin/python
        echo "+ .venv/bin/pip install -e . -q    (limit ${T_SETUP}s)"
        if ! limit "$T_SETUP" "$PY" -m pip install -e . -q >"$RESULTS/setup.log" 2>&1; then
            tail -n 15 "$RESULTS/setup.log"
            echo "+ .venv/bin/pip install -e . -q --no-deps --no-build-isolation --ignore-requires-python" \
                 "   (the machine's torch / timm / setuptools: no index needed)"
            limit 120 "$PY" -m pip install -e . -q --no-deps --no-build-isolation --ignore-requires-python \
                >>"$RESULTS/setup.log" 2>&1
        fi
        info=$(probe "$PY")
        if [ -z "$info" ]; then  # no setuptools either: the source tree itself
            info=$(PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" probe "$PY")
            [ -n "$info" ] && export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" \
                && echo "device_check: not installed; using the source tree (PYTHONPATH=$repo)"
        fi
        if [ -z "$info" ]; then
            echo "device_check: lidc_cdam still does not import: removing the .venv made just now"
            rm -rf "$repo/.venv"
            install_hint "$PY"
            exit 2
        fi
    fi
fi
[ -n "$info" ] || { install_hint "$PY"; exit 2; }
echo "device_check: python $PY (torch, CUDA build, CUDA available: $info)"
if [ "${DEVICE%%:*}" = cuda ] && [ "${info##* }" != True ]; then
    echo "device_check: --device $DEVICE but torch sees no GPU; on a CPU machine run the smoke mode (--smoke)"
    exit 2
fi
[ "$SETUP_ONLY" = 1 ] && exit 0

# ---------------------------------------------------------------- the parts
status_file=$RESULTS/status.tsv
: >"$status_file"
b=benchmarks
bf16_methods=()

run_part() {  # name, limit in seconds, command...
    local name=$1 seconds=$2; shift 2
    echo
    echo "=== $name (limit ${seconds}s): python ${*:2}"
    rm -f "$RESULTS/$name.json"  # no stale figures from an earlier run
    local start rc
    start=$(date +%s)
    limit "$seconds" "$@" 2>&1 | tee "$RESULTS/$name.txt"
    rc=${PIPESTATUS[0]}
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - start ))" "$seconds" >>"$status_file"
}

if [ "$SMOKE" = 1 ]; then
    echo "device_check: SMOKE run on $DEVICE, tiny sizes, results in $RESULTS"
    cdam=(--models vit_tiny_patch16_224 --image-size 32 --targets 2 --repeats 1 --naive-points 1 --n 4)
    evaluate=(--model vit_tiny_patch16_224 --image-size 48 --images 1 --box-sizes 1 2 --n-boxes 3 --forward-repeats 2)
    runner=(--model vit_tiny_patch16_224 --image-size 64 --images 2 --box-sizes 1 2 --n-boxes 3)
    train=(--model vit_tiny_patch16_224 --image-size 32 --batch-size 4 --steps 2 --warmup 1)
    bf16_methods=(--methods cdam smooth-cdam relevance-propagation)  # bf16 is slow on most CPUs
else
    echo "device_check: on $DEVICE, results in $RESULTS"
    cdam=(--models vit_small_patch16_224 vit_small_patch8_224 --image-size 224 --targets 1 9 --repeats 5)
    evaluate=(--model vit_small_patch8_224 --image-size 224 --images "$EVAL_IMAGES")
    runner=(--model vit_small_patch8_224 --image-size 224 --images "$RUNNER_IMAGES")
    train=(--model vit_small_patch16_224 --image-size 224 --batch-size 64 --steps 50 --warmup 10)
fi
common=(--device "$DEVICE" --threads "$THREADS")
evaluate+=(--config paper-imagenet --source auto)  # scikit-image's photographs where installed, else digits
runner+=(--config paper-imagenet)

run_part cdam_fp32 "$T_CDAM" "$PY" $b/bench_cdam.py "${cdam[@]}" "${common[@]}" --amp none \
    --out "$RESULTS/cdam_fp32.json"
run_part cdam_bf16 "$T_CDAM" "$PY" $b/bench_cdam.py "${cdam[@]}" "${common[@]}" --amp bf16 \
    --out "$RESULTS/cdam_bf16.json"
run_part evaluate_fp32 "$T_EVAL" "$PY" $b/bench_evaluate.py "${evaluate[@]}" "${common[@]}" --amp none \
    --out "$RESULTS/evaluate_fp32.json"
run_part evaluate_bf16 "$T_EVAL_BF16" "$PY" $b/bench_evaluate.py "${evaluate[@]}" "${bf16_methods[@]}" \
    "${common[@]}" --amp bf16 --out "$RESULTS/evaluate_bf16.json"
run_part runner "$T_RUNNER" "$PY" $b/bench_runner.py "${runner[@]}" "${common[@]}" --out "$RESULTS/runner.json"
run_part train "$T_TRAIN" "$PY" $b/train_step.py "${train[@]}" "${common[@]}" --amp bf16 none \
    --out "$RESULTS/train.json"

# ---------------------------------------------------------------- summary (JSON only: no torch import)
gpu_smi=$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -n 1)
SMOKE=$SMOKE DEVICE=$DEVICE GPU_SMI=$gpu_smi "$PY" - "$RESULTS" <<'EOF'
import json
import os
import sys
from pathlib import Path

out = Path(sys.argv[1])
parts = {}
for line in (out / "status.tsv").read_text().splitlines():
    name, rc, seconds, limit = line.split("\t")
    rc = int(rc)
    status = "ok" if rc == 0 else "timeout" if rc in (124, 137) else f"failed (exit {rc})"
    parts[name] = {"status": status, "exit_code": rc, "seconds": int(seconds), "limit_s": int(limit),
                   "json": f"{name}.json", "txt": f"{name}.txt"}


def load(name):
    path = out / f"{name}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def cdam_line(data):
    rows = [r for r in data["rows"] if r["targets"] == min(r["targets"] for r in data["rows"])]
    bits = []
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = {r["method"]: r for r in rows if r["model"] == model}
        fwd = next(iter(mine.values()))["forward_s"] * 1e3
        short = model.replace("vit_", "").replace("_patch", "/").replace("_224", "")
        ratios = ", ".join(f"{m.replace('integrated-cdam', 'int').replace(' space=', ':')} {r['ours_ratio']:.2f}"
                           for m, r in mine.items())
        bits.append(f"{short}: fwd {fwd:.1f} ms; x fwd: {ratios}")
    worst = max(data.get("check_rel_error", {}).values(), default=float("nan"))
    return " | ".join(bits) + f" | check err {worst:.0e}"


def evaluate_line(data):
    s = data["summary"]
    return (f"{s['images_per_minute']:.1f} images/min ({len(s['methods'])} methods, {s['images']} images, "
            f"{len(s['box_sizes'])}x{s['n_boxes']} boxes); metrics {s['metrics_s_per_image']:.2f} s/image = "
            f"{s['ratio_to_lower_bound']:.2f} x lower bound ({s['forwards_per_image']} forwards, "
            f"{s['lower_bound_s_per_image']:.2f} s); explanations {s['explain_s_per_image']:.2f} s/image"
            + ("; metric values: timing only (bf16)" if s.get("metric_values", "valid") != "valid" else ""))


def runner_line(data):
    s = data["summary"]
    return (f"{s['images_per_minute']:.1f} images/min through lidc-cdam benchmark's runner ({len(s['methods'])} "
            f"methods, {s['images']} images, {len(s['box_sizes'])}x{s['n_boxes']} boxes); {s['s_per_image']:.2f} s/image")


def train_line(data):
    return "; ".join(f"{r['amp']}: {r['steps_per_s']:.2f} steps/s ({r['images_per_s']:.0f} img/s, batch "
                     f"{r['batch_size']}, {r['ms_per_step']:.1f} ms/step)" for r in data["rows"])


describe = {"cdam": cdam_line, "evaluate": evaluate_line, "runner": runner_line, "train": train_line}
environment = None
for name, part in parts.items():
    data = load(name)
    if data is None:
        part["line"] = part["status"] + ("" if part["status"] != "ok" else ": no JSON written")
        if part["status"] == "ok":
            part["status"] = "failed (no JSON)"
        continue
    environment = environment or data.get("environment")
    try:
        part["line"] = describe[name.split("_")[0]](data)
    except (KeyError, ValueError, TypeError) as err:
        part["line"] = f"(could not summarise: {err!r})"
    if name.startswith(("evaluate", "runner")):
        part["result"] = data["summary"]
    elif name == "train":
        part["result"] = data["rows"]
    else:
        part["result"] = {"check_rel_error": data.get("check_rel_error"), "rows": data["rows"]}

environment = dict(environment or {})
environment["nvidia_smi"] = os.environ.get("GPU_SMI") or None
summary = {"smoke": os.environ.get("SMOKE") == "1", "device": os.environ.get("DEVICE"), "environment": environment,
           "total_seconds": sum(p["seconds"] for p in parts.values()),
           "all_ok": all(p["status"] == "ok" for p in parts.values()), "parts": parts}
(out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
gpu = environment.get("gpu") or environment.get("nvidia_smi") or "no GPU"
lines = [f"device_check on {summary['device']} ({gpu}); torch {environment.get('torch')}, "
         f"CUDA {environment.get('cuda')}; {'SMOKE (tiny sizes) ' if summary['smoke'] else ''}"
         f"{summary['total_seconds']} s in all"]
lines += [f"{name:14s} {p['status']:8s} {p['seconds']:4d}/{p['limit_s']:<4d}s  {p.get('line', '')}"
          for name, p in parts.items()]
(out / "summary.txt").write_text("\n".join(lines) + "\n")
print("\n" + "\n".join(lines))
EOF
rc=$?
if [ -n "$ARCHIVE" ]; then
    mkdir -p "$(dirname "$ARCHIVE")" && tar -czf "$ARCHIVE" -C "$(dirname "$RESULTS")" "$(basename "$RESULTS")" \
        && echo "device_check: packed into $ARCHIVE"
fi
echo "device_check: results in $RESULTS"
[ $rc -eq 0 ] || exit $rc
# exit 1 when any part failed or ran out of time
awk -F '\t' '$2 != 0 { bad = 1 } END { exit bad }' "$status_file"
