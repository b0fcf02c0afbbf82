#!/usr/bin/env bash
# minidit on one CUDA GPU, offline, in at most 8 minutes: the CUDA tests, the benchmark suite, and a
# markdown report benchmarks/results/<gpu-name-slug>-<date>.md.
#
#   benchmarks/gpu.sh              # on the GPU machine (any working directory)
#   benchmarks/gpu.sh --dry-run    # the same stages, tiny, on the CPU: checks the plumbing and the report
#
# Stages, in order; each runs under `timeout` within what is left of the budget, and a stage that
# fails or times out is recorded in the report and the next one runs:
#   env       python, torch, CUDA, GPU, and which optional packages import
#   tests     python -m pytest -m cuda -q tests/test_model.py (the CUDA-only tests)
#   xl2       DiT-XL/2 256 px (32x32x4 latents): the reference recipe as it runs today (fp32/TF32, timm's
#             fused SDPA, eager) vs bf16+sdpa+compile (the headline row), then a sweep showing each step's
#             contribution: fp32 (minidit's fused AdamW + foreach EMA only), bf16 (+ autocast), bf16+flash
#             (flash-attn, if installed), and ref-2023 (the reference with the 2023 math attention: an
#             extra)
#   b2        DiT-B/2 256 px: reference vs bf16+sdpa+compile
#   s2cifar   DiT-S/2 on the CIFAR-10 config (pixels 32x32x3, 10 classes, batch 128): reference vs
#             bf16+sdpa+compile
#   report    benchmarks/results/<gpu-name-slug>-<date>.md (every stage's tables, or its log tail)
#
# Environment: PYTHON (default python, else python3), BUDGET_S (default 450 s for all stages), OUT_DIR (default
# benchmarks/results; a temporary directory with --dry-run), KEEP_WORK=1 keeps the raw logs and JSON.
set -uo pipefail

DRY_RUN=0
for arg in "$@"; do
    case $arg in
        --dry-run) DRY_RUN=1 ;;
        -h | --help) awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"; exit 0 ;;
        *) echo "error: unknown argument $arg (use --dry-run or --help)" >&2; exit 2 ;;
    esac
done

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python}
command -v "$PY" >/dev/null || PY=python3
START=$(date +%s)
BUDGET_S=${BUDGET_S:-450}
DEADLINE=$((START + BUDGET_S))
DATE=$(date +%Y-%m-%d)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/minidit-gpu.XXXXXX")
if ((DRY_RUN)); then
    OUT_DIR=${OUT_DIR:-$WORK/results}
else
    OUT_DIR=${OUT_DIR:-$ROOT/benchmarks/results}
fi
mkdir -p "$OUT_DIR"
STAGES=()  # "name|status|wall_s|command" per stage, for the report

# -- what each stage runs: full size on the GPU, tiny on the CPU with --dry-run ------------------
XL_CONFIGS="ref,bf16+sdpa+compile,fp32,bf16,bf16+flash,ref-2023"
if ((DRY_RUN)); then
    # bf16 and compile rows are skipped on a CPU (with a note); the fp32 row keeps a minidit row measured
    DEV=(--device cpu --quick)
    XL=(--model DiT-S/8 --input-size 16 --batch-size 2 --warmup 1 --iters 1 --repeats 2)
    XL_CONFIGS="ref,fp32,bf16+sdpa+compile,bf16,bf16+flash,ref-2023"
    B2=(--model DiT-Ti/8 --input-size 16 --batch-size 2 --warmup 1 --iters 1 --repeats 2)
    S2=(--model DiT-Ti/8 --input-size 16 --in-channels 3 --num-classes 10 --batch-size 2 --warmup 1 --iters 1 --repeats 2)
    MINI_CONFIGS="ref,fp32,bf16+sdpa+compile"
else
    DEV=(--device cuda)
    XL=(--model DiT-XL/2 --input-size 32 --warmup 3 --iters 5 --repeats 5)  # batch: 32 under 100 GiB, else 64
    B2=(--model DiT-B/2 --input-size 32 --batch-size 64 --warmup 3 --iters 10 --repeats 5)
    S2=(--model DiT-S/2 --input-size 32 --in-channels 3 --num-classes 10 --batch-size 128 --warmup 3 --iters 10 --repeats 5)
    MINI_CONFIGS="ref,bf16+sdpa+compile"
fi

run_stage() {  # run_stage NAME MAX_SECONDS COMMAND...: under timeout, within what is left of the budget
    local name=$1 max=$2
    shift 2
    local left=$((DEADLINE - $(date +%s)))
    local limit=$((max < left ? max : left))
    if ((limit < 15)); then
        STAGES+=("$name|skipped: out of time budget|0|$*")
        echo "== $name: skipped (only ${left}s of the budget left)"
        return
    fi
    echo "== $name (limit ${limit}s): $*"
    local t0 rc status
    t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" >"$WORK/$name.log" 2>&1
    rc=$?
    case $rc in
        0) status=ok ;;
        124 | 137) status="timed out after ${limit}s" ;;
        *) status="failed (exit $rc)" ;;
    esac
    STAGES+=("$name|$status|$(($(date +%s) - t0))|$*")
    echo "   $status in $(($(date +%s) - t0))s; log tail:"
    tail -n 4 "$WORK/$name.log" | sed 's/^/   | /'
}

bench() {  # bench NAME MAX_SECONDS ARGS...: one python -m minidit.bench run writing NAME.json and NAME.md
    local name=$1 max=$2
    shift 2
    run_stage "$name" "$max" "$PY" -m minidit.bench "${DEV[@]}" "$@" --json "$WORK/$name.json" --markdown "$WORK/$name.md"
}

# -- the stages -----------------------------------------------------------------------------------
run_stage env 30 "$PY" - <<'EOF'
import importlib, platform, sys
import torch
print(f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"cuda available: {torch.cuda.is_available()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU: {torch.cuda.get_device_name(0)}, {p.total_memory / 2**30:.1f} GiB, capability {p.major}.{p.minor}, "
          f"bf16: {torch.cuda.is_bf16_supported()}")
found = {}
for mod in ("numpy", "PIL", "einops", "tqdm", "safetensors", "torchvision", "matplotlib", "diffusers", "flash_attn",
            "scipy", "pytest"):
    try:
        found[mod] = getattr(importlib.import_module(mod), "__version__", "yes")
    except Exception as e:
        found[mod] = f"missing ({type(e).__name__})"
print("packages: " + ", ".join(f"{k} {v}" for k, v in found.items()))
EOF
run_stage tests 60 "$PY" -m pytest -o addopts="" -m cuda -q -p no:cacheprovider --continue-on-collection-errors tests/test_model.py
bench xl2 240 "${XL[@]}" --configs "$XL_CONFIGS"
bench b2 100 "${B2[@]}" --configs "$MINI_CONFIGS"
bench s2cifar 90 "${S2[@]}" --configs "$MINI_CONFIGS"

# -- the report -----------------------------------------------------------------------------------
{
    read -r GPU_NAME
    read -r TORCH
    read -r PYVER
} < <("$PY" -c 'import platform, torch
print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")
print(torch.__version__, "CUDA", torch.version.cuda)
print(platform.python_version())' 2>/dev/null)
GPU_NAME=${GPU_NAME:-unknown}
SLUG=$(echo "$GPU_NAME" | tr '[:upper:]' '[:lower:]' | sed -E 's/[^a-z0-9]+/-/g; s/^-+|-+$//g')
((DRY_RUN)) && SLUG="$SLUG-dry-run"
REPORT="$OUT_DIR/$SLUG-$DATE.md"
COMMIT=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
DIRTY=$(git -C "$ROOT" status --porcelain 2>/dev/null | grep -c . || true)
{
    echo "# minidit benchmarks: $GPU_NAME, $DATE"
    echo
    ((DRY_RUN)) && echo "**Dry run on the CPU** (tiny models: checks the script and the report, not the numbers)." && echo
    echo "- device: $GPU_NAME"
    echo "- torch: ${TORCH:-unknown}; python: ${PYVER:-unknown}"
    echo "- nvidia-smi: $(nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>/dev/null | head -n 1 || echo n/a)"
    echo "- code: commit $COMMIT ($DIRTY files changed or untracked)"
    echo "- command: benchmarks/gpu.sh $*; total $(($(date +%s) - START)) s of a ${BUDGET_S} s budget"
    echo "- each table row's '× ref' is its images/s over the reference recipe's as it runs today (fp32 with TF32"
    echo "  matmuls, timm's fused SDPA attention, eager, torch's default AdamW, EMA as a Python loop), measured in the"
    echo "  same process on the same batch; ref-2023 (math attention, as in 2023) is an extra row, not the baseline"
    echo
    echo "## Stages"
    echo
    echo "| stage | status | wall s | command |"
    echo "|---|---|---|---|"
    for s in "${STAGES[@]}"; do
        IFS='|' read -r name status wall cmd <<<"$s"
        echo "| $name | $status | $wall | \`${cmd//$WORK\//}\` |"
    done
    echo
    echo "## Environment"
    echo
    echo '```'
    cat "$WORK/env.log" 2>/dev/null
    echo '```'
    echo
    echo "## CUDA tests"
    echo
    echo '```'
    grep -E "passed|failed|skipped|error|deselected|no tests ran" "$WORK/tests.log" 2>/dev/null | tail -n 5
    echo '```'
    for name in xl2 b2 s2cifar; do
        case $name in
            xl2) title="DiT-XL/2, 256 px: reference vs minidit, and the sweep" ;;
            b2) title="DiT-B/2, 256 px" ;;
            s2cifar) title="DiT-S/2, CIFAR-10 config (pixels 32x32x3, 10 classes)" ;;
        esac
        echo
        echo "## $title"
        echo
        if [[ -s "$WORK/$name.md" ]]; then
            cat "$WORK/$name.md"
        else
            echo "No results."
        fi
        if ! grep -q "^$name|ok|" < <(printf '%s\n' "${STAGES[@]}"); then
            echo
            echo "Stage did not finish cleanly; last lines of its log:"
            echo
            echo '```'
            tail -n 25 "$WORK/$name.log" 2>/dev/null
            echo '```'
        fi
    done
} >"$REPORT"
echo "== report: $REPORT ($(($(date +%s) - START)) s in all)"
if [[ -n "${KEEP_WORK:-}" ]]; then
    echo "   raw logs and JSON: $WORK"
elif ((DRY_RUN)); then
    echo "   (dry run: the report is in $WORK, kept)"
else
    for f in "$WORK"/*.json; do  # raw timings next to the report
        [[ -e $f ]] && cp "$f" "$OUT_DIR/$SLUG-$DATE-$(basename "$f")"
    done
    rm -rf "$WORK"
fi
