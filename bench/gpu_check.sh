#!/usr/bin/env bash
# The harvest of a lent GPU machine in one call: 450 s of steps (GPU_CHECK_BUDGET; about 460 s with a
# cut step's 10 s to stop) on a fresh H100/H200, install included. Steps are ordered by value; each has
# its own time limit, capped at what is left of the budget, and a step that fails does not stop the next.
#
#     bash bench/gpu_check.sh              # results in $OUT (default out/gpu_check)
#
# 0. install (below) and versions: GPU, driver, Python, torch, CUDA, Triton, transformers, DeepSpeed (the
#    device first: whether the run has CUDA, and its GPU's name in the results' file names);
# 1. cuda_kernels: the kernels' CUDA tests at real tiles (the 16-bit tensor-core path, which the
#    interpreter cannot run);
# 2. bucketed attention forward and backward, L = 512, 2048, 4096 (B * L = 16k, H = 12, D = 64,
#    bf16) against transformers' SDPA with the same bias and FlexAttention with a learnable bias;
# 3. cuda_models: the models' CUDA tests, a training step under bf16 autocast of T5 v1.1 (native and
#    patched), LongT5 transient-global, BlenderbotSmall and UMT5 (patched): every kernel, both ways in;
# 4. one patched transformers T5 v1.1-base training step against the unpatched model;
# 5. LongT5 local and transient-global attention at 16k tokens;
# 6. the FFN, the norm and the fused loss;
# 7. padded, length-bucketed and packed batches of a FLAN-like mixture (T5 v1.1-base, 2,048 tokens);
# 8. a one-GPU ZeRO-3 run of t5-base.
#
# Time limits: (cold compiles + the step's run) * 1.3. A cold Triton cache compiles each build a step
# launches once, where the step's first call of it waits.
# - Seconds per build, measured on the development machine's CPU (2 cores) with Triton 3.6, the GPU
#   machines' release: every sm_90 bf16 build of the static report, one process, a fresh cache, 0.39 s
#   on average and 1.02 s at most (145 builds in 56 s); each build's C launcher 0.2 s more (gcc -O3 of
#   the launcher's source). Limits take 1.22 s a build.
# - Builds per step, counted on the CPU by `bench/compile_count.py` (each launch keyed as Triton's own
#   launch keys it for sm_90, without a GPU): cuda_kernels 62 (`--gpu-tests pytest -m cuda tests/kernels`:
#   66, less the 4 fp32 builds of a test whose fp32 a GPU sends to PyTorch), cuda_models 35; at the GPU
#   sizes (`--gpu-sizes`) bucketed_attention 4, local_attention 13, ffn 3, rms_norm 8, cross_entropy 1;
#   at `--quick` sizes (bench_train.py has no other way onto the CPU) a T5 v1.1 training step 21 (the
#   native model and the patched one) and packing 24. Where the GPU cuts a forward's tile for a short
#   length, a build can be two there (the tool's docstring).
# - The runs themselves (imports, do_bench, inductor's compiles of FlexAttention and the torch.compile
#   baselines) are estimates: no GPU has run them yet.
# The limits of the later steps add up past the budget: they run on what the earlier ones leave. Each
# step's line in steps.txt says how many kernels and C launchers it compiled (new files in the Triton
# cache, TRITON_CACHE_DIR, which torch.compile's kernels share): on a fresh machine's first run, with
# its cold cache, the measured counts for the next limits (a build an earlier step made is not counted
# again, and a rerun finds most of them made).
#
# What it writes: the device tool returns at most 8 files from $OUT, at most 2 folders deep, 16 MiB
# each. Everything is written as the run goes, so a run cut short returns every step that finished:
#   steps.txt       one line per finished step (exit status, seconds, limit) and the step's last lines
#   versions.txt    what the machine has, and where each package was imported from
#   results.tar.gz  gpu_check/: every step's log (versions.log is versions.txt), every CSV and JSONL,
#                   steps.txt; re-packed after each step (written beside, then renamed: never half an archive)
#   current.log     the log of the step that was running when the run was cut short (absent otherwise)
#
# Install, and why this way. The machine reaches no registry, has transformers 5.17 (fastseq.patch
# needs >= 5.23) and no DeepSpeed. `python bench/carry.py fetch` builds those wheels and DeepSpeed's
# missing dependencies into .whl/ beforehand, and the run carries .whl. Here `bench/carry.py select`
# picks the wheels this interpreter can install and lacks (missing, or older), and they go into a
# folder of this run with `pip install --no-index --no-deps --target`, first on PYTHONPATH. The
# machine's own site-packages stay as they are: nothing there is upgraded or removed, so what was
# resolved against its transformers 5.17 keeps it, no registry is asked, and a wheel that does not
# fit cannot leave an installed package half replaced. fastseq itself: `pip install -e .` only when
# the interpreter does not already import this checkout's fastseq; GPU_CHECK_INSTALL=0 never does.
#
# Environment: OUT; PYTHON (default python3); WHEELS (default .whl); GPU_CHECK_COMMIT (the commit, for
# versions.txt, where the checkout has no git); GPU_CHECK_BUDGET (seconds);
# GPU_CHECK_INSTALL=0 (install nothing into the Python environment); GPU_CHECK_ONLY="STEP ..." (a
# rerun of these steps alone, after the install and the versions). Without CUDA every GPU step
# fails within seconds: the benchmark scripts stop at "no CUDA device", the CUDA tests are only
# collected, the ZeRO-3 run is not started. tests/bench/test_gpu_check.py dry-runs the script so on the CPU.
set -uo pipefail

cd "$(dirname "$0")/.." || exit 1
export PY="${PYTHON:-python3}" WHEELS="${WHEELS:-.whl}" GPU_CHECK_INSTALL="${GPU_CHECK_INSTALL:-1}"
BUDGET="${GPU_CHECK_BUDGET:-450}"
OUT="${OUT:-out/gpu_check}"
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)" || exit 1
rm -f "$OUT"/{steps.txt,steps.txt.part,versions.txt,results.tar.gz,results.tar.gz.part,current.log}
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")" || exit 1
export RES="$WORK/gpu_check" SITE="$WORK/site" WORK  # RES is what results.tar.gz holds
mkdir -p "$RES" "$SITE"
: > "$RES/steps.txt"
# The checkout on the path too: the benchmarks (`python bench/x.py`) import fastseq from it even where its
# editable install failed.
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# The kernels as a user runs them: compiled for the GPU (not interpreted), under the default backend.
unset TRITON_INTERPRET FASTSEQ_BACKEND
for var in $(compgen -e | grep '^FASTSEQ_BACKEND_'); do unset "$var"; done
# One cache for Triton and torch.compile's Triton kernels (inductor takes TRITON_CACHE_DIR when it is set),
# kept across a rerun on the same machine; the run's own folder where that one cannot be written.
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-${HOME:-/tmp}/.triton/cache}"
if ! { mkdir -p "$TRITON_CACHE_DIR" && [ -w "$TRITON_CACHE_DIR" ]; } 2> /dev/null; then
    TRITON_CACHE_DIR="$WORK/triton_cache"
    mkdir -p "$TRITON_CACHE_DIR"
fi
started=$(date +%s)
has_cuda=0
tag=nocuda
current=""  # the step running now
child=""    # its `timeout` process
before=(0 0)  # the cache's kernels and launchers when it started (`compiled`)

pack() {  # $RES into results.tar.gz, then steps.txt beside it: each step in steps.txt is in the archive
    tar -C "$WORK" -czf "$OUT/results.tar.gz.part" gpu_check && mv -f "$OUT/results.tar.gz.part" "$OUT/results.tar.gz"
    cp "$RES/steps.txt" "$OUT/steps.txt.part" && mv -f "$OUT/steps.txt.part" "$OUT/steps.txt"
}

keep_zero3_metrics() {  # the ZeRO-3 run's metrics so far, whatever its outcome: a failed or cut run says how far it got
    if [ -f "$WORK/zero3_run/metrics.jsonl" ]; then
        cp "$WORK/zero3_run/metrics.jsonl" "$RES/zero3_t5_base_$tag.jsonl"
    fi
}

compiled() {  # "KERNELS LAUNCHERS": the compiled kernels (cubins) and C launchers in the Triton cache
    local kernels launchers
    kernels=$(find "$TRITON_CACHE_DIR" -name '*.cubin' 2> /dev/null | wc -l)
    launchers=$(find "$TRITON_CACHE_DIR" -name '__triton_launcher*' 2> /dev/null | wc -l)
    echo "$kernels $launchers"
}

finish() {  # finish NAME EXIT SECONDS LIMIT: file the step's log, note its outcome and compiles, re-pack
    mv -f "$OUT/current.log" "$RES/$1.log"
    current=""
    local now made
    read -r -a now <<< "$(compiled)"
    made="compiled $(( now[0] - before[0] )) kernels, $(( now[1] - before[1] )) launchers"
    { echo "$1: exit $2 in $3 s (limit $4 s); $made"; tail -n 6 "$RES/$1.log" | sed 's/^/    /'; } \
        | tee -a "$RES/steps.txt"
    pack
}

step() {  # step [--cuda] NAME SECONDS COMMAND...: run COMMAND with a time limit, log to current.log
    local need_cuda=0
    if [ "$1" = --cuda ]; then need_cuda=1; shift; fi
    local name=$1 limit=$2 rc t0
    shift 2
    if [ -n "${GPU_CHECK_ONLY:-}" ] && [[ " install versions device_probe $GPU_CHECK_ONLY " != *" $name "* ]]; then return; fi
    t0=$(date +%s)
    read -r -a before <<< "$(compiled)"
    local left=$(( BUDGET - (t0 - started) ))
    if (( limit > left )); then limit=$(( left > 0 ? left : 0 )); fi
    current=$name
    echo "\$ $*" > "$OUT/current.log"
    if (( limit < 5 )); then
        echo "the run's $BUDGET s are spent: not run" >> "$OUT/current.log"
        rc=124
    elif (( need_cuda && !has_cuda )); then
        echo "no CUDA device: not run" >> "$OUT/current.log"
        rc=2
    else
        # In the background and waited for, so that a signal to this script is handled at once.
        timeout --signal=TERM --kill-after=10 "$limit" "$@" >> "$OUT/current.log" 2>&1 &
        child=$!
        wait "$child"
        rc=$?
        child=""
    fi
    finish "$name" "$rc" $(( $(date +%s) - t0 )) "$limit"
}

cut_short() {  # on TERM, INT or HUP: stop the step, keep its log so far, re-pack, leave
    trap - TERM INT HUP
    if [ -n "$child" ]; then
        kill -TERM "$child" 2>/dev/null
        wait "$child"
    fi
    if [ -n "$current" ]; then
        echo "(cut short by a signal)" >> "$OUT/current.log"
        finish "$current" 143 "?" "?"
    fi
    echo "gpu_check: cut short by a signal after $(( $(date +%s) - started )) s" >> "$RES/steps.txt"
    keep_zero3_metrics
    pack
    rm -rf "$WORK"
    exit 143
}
trap cut_short TERM INT HUP

install() {  # the carried wheels into $SITE, then fastseq itself if this interpreter lacks it
    local wheels rc=0
    if [ -d "$WHEELS" ]; then
        wheels=$("$PY" bench/carry.py select "$WHEELS") || rc=1
        if [ -n "$wheels" ]; then
            # shellcheck disable=SC2086  # one path a line, no spaces
            "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" $wheels || rc=1
        fi
    else
        echo "no $WHEELS folder: nothing carried"
    fi
    # Installed editable from this checkout? (read from its record, without importing torch; -I keeps a
    # stale fastseq.egg-info in the checkout, first on the path with -c, from hiding the record)
    if "$PY" -I -c "
import importlib.metadata, json, pathlib, sys
try:
    url = json.loads(importlib.metadata.distribution('fastseq').read_text('direct_url.json') or '{}')
except importlib.metadata.PackageNotFoundError:
    url = {}
ours = url.get('url') == pathlib.Path.cwd().resolve().as_uri() and url.get('dir_info', {}).get('editable')
sys.exit(0 if ours else 1)"; then
        echo "fastseq: installed from this checkout (editable)"
    elif [ "$GPU_CHECK_INSTALL" = 0 ]; then
        echo "fastseq: not importable from this checkout, and GPU_CHECK_INSTALL=0: not installed"
        rc=1
    else
        "$PY" -m pip install -q --no-index --no-build-isolation --no-deps -e . || rc=1
    fi
    # What fastseq, DeepSpeed and transformers require and this machine still lacks, in one line.
    "$PY" bench/carry.py check fastseq deepspeed transformers || rc=1
    return $rc
}

# The device's lines in versions.txt: "tag: NAME" (h100, h200: the results' file names) where there is
# a CUDA device, "device: no CUDA device" where there is none. The versions step prints them first; where
# it printed neither (it failed or was cut before torch answered), `device_probe` asks again.
export DEVICE_PY='
import torch

if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device: {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.1f} GiB")
    print("tag:", p.name.split()[1].lower() if " " in p.name else "gpu")
else:
    print("device: no CUDA device")
'

versions() {
    "$PY" - <<'PY'
import os

try:
    exec(os.environ["DEVICE_PY"])
    print("cuda runtime:", torch.version.cuda, "cudnn:", torch.backends.cudnn.version())
except Exception as err:  # noqa: BLE001 - the versions below say what the machine has all the same
    print(f"device: unknown (torch: {type(err).__name__}: {err})")
import datetime
import importlib
import importlib.metadata
import pathlib
import platform
import shutil
import subprocess
import sys

print("date:", datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
print("python:", platform.python_version(), sys.executable)
commit = os.environ.get("GPU_CHECK_COMMIT", "")
if not commit and shutil.which("git"):
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
print("commit:", commit or "(no git here; GPU_CHECK_COMMIT names it)")
for name in ("torch", "triton", "transformers", "deepspeed", "fastseq"):
    try:
        module = importlib.import_module(name)
        print(f"{name}: {module.__version__} from {module.__file__}")
    except Exception as err:  # noqa: BLE001 - a missing package is a line of the report
        print(f"{name}: missing ({type(err).__name__}: {err})")
for name in ("pytest", "regex", "huggingface-hub", "safetensors", "tokenizers"):
    try:
        print(f"{name}: {importlib.metadata.version(name)}")
    except importlib.metadata.PackageNotFoundError:
        print(f"{name}: missing")
site = pathlib.Path(os.environ["SITE"])
for dist in importlib.metadata.distributions(path=[str(site)]):
    name = dist.metadata["Name"]
    seen = pathlib.Path(importlib.metadata.distribution(name).locate_file("")) == site
    print(f"carried: {name} {dist.version}" + ("" if seen else " (shadowed by another copy!)"))
for key in sorted(os.environ):
    if key.startswith(("FASTSEQ_", "TRITON_", "CUDA_", "TORCH_")):
        print(f"env: {key}={os.environ[key]}")
PY
    local rc=$?
    if command -v gcc > /dev/null; then gcc --version | head -n 1; else echo "no gcc"; fi
    if command -v nvidia-smi > /dev/null; then nvidia-smi 2>&1 | head -n 20; else echo "no nvidia-smi"; fi
    return $rc
}

device_probe() {  # the device's lines alone, where the versions step printed neither
    "$PY" -c "$DEVICE_PY"
}

zero3() {  # ZeRO-3 on one GPU: a ByT5 tokenizer (nothing to download), 20 steps of t5-base
    "$PY" -c "import sys; from fastseq.tokenizers import ByT5Tokenizer; ByT5Tokenizer().save_pretrained(sys.argv[1])" \
        "$WORK/byt5_tokenizer" || return
    "$PY" -m deepspeed.launcher.runner --num_gpus 1 --module fastseq.train \
        --deepspeed configs/deepspeed/zero3.json --model t5-base --random-init --tokenizer "$WORK/byt5_tokenizer" \
        --steps 20 --batch-size 8 --optimizer adamw --lr 1e-4 --quiet --max-eval-samples 0 \
        --output-dir "$WORK/zero3_run"
}

export -f install versions device_probe zero3

step install 40 bash -c install
# 30 s: the first import of torch and CUDA on a freshly started machine reads their libraries from a cold disk.
step versions 30 bash -c versions
if ! grep -q "^tag: \|^device: no CUDA device\|s are spent: not run" "$RES/versions.log"; then
    step device_probe 30 bash -c device_probe
    cat "$RES/device_probe.log" >> "$RES/versions.log"
fi
cp "$RES/versions.log" "$OUT/versions.txt"
if grep -q "^tag: " "$RES/versions.log"; then
    has_cuda=1
    tag=$(sed -n 's/^tag: //p' "$RES/versions.log")
fi
export tag

# Without CUDA the tests marked `cuda` would run through the interpreter (slowly): only collected then
# (one test id a line). With CUDA, -v: each test's outcome as it ends, so a step cut short says which passed.
mode=$( (( has_cuda )) && echo -v || echo "--collect-only -q")
# shellcheck disable=SC2206  # $mode: one or two words
pytest_cuda=("$PY" -m pytest $mode -m cuda -p no:cacheprovider -rfEs --tb=short --durations=10
             --continue-on-collection-errors)
step cuda_kernels 125 "${pytest_cuda[@]}" tests/kernels
step bucketed_attention 75 "$PY" bench/bench_bucketed_attention.py --lengths 512 2048 4096 \
    --out "$RES/bucketed_attention_$tag.csv"
step cuda_models 82 "${pytest_cuda[@]}" tests --ignore=tests/kernels
step train 60 "$PY" bench/bench_train.py --models google/t5-v1_1-base --steps 10 --warmup 2 --out "$RES/train_$tag.csv"
step local_attention 45 "$PY" bench/bench_local_attention.py --lengths 16384 --out "$RES/local_attention_$tag.csv"
step ffn 25 "$PY" bench/bench_ffn.py --out "$RES/ffn_$tag.csv"
step rms_norm 27 "$PY" bench/bench_rms_norm.py --out "$RES/rms_norm_$tag.csv"
step cross_entropy 25 "$PY" bench/bench_cross_entropy.py --out "$RES/cross_entropy_$tag.csv"
step packing 55 "$PY" bench/bench_train.py --packing --steps 8 --warmup 2 --passes 2 --out "$RES/packing_$tag.csv"
step --cuda zero3_t5_base 45 bash -c zero3
keep_zero3_metrics

echo "gpu_check: done in $(( $(date +%s) - started )) s" >> "$RES/steps.txt"
pack
rm -rf "$WORK"
ls -l "$OUT"
