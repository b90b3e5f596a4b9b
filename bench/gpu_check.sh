#!/usr/bin/env bash
# The harvest of a lent GPU machine, bounded to about 8 minutes on a fresh H100/H200, install
# included (the step limits add up to 7 min 25 s), ordered by value. Each step has its own time
# limit and writes its log or CSV to $OUT as soon as it ends, so a run cut short still returns
# what finished.
#
#     bash bench/gpu_check.sh                  # results in bench/results (OUT=... elsewhere)
#
# A machine without DeepSpeed gets it from a wheel built beforehand where the registries are
# reachable, `pip wheel --no-deps deepspeed -w .whl` (.whl/ is ignored by git: carry it along).
#
# 1. the CUDA tests at real tiles (the 16-bit tensor-core path, which the interpreter cannot run);
# 2. bucketed attention forward and backward, L = 512, 2048, 4096 (B * L = 16k, H = 12, D = 64,
#    bf16) against transformers' SDPA with the same bias and FlexAttention with a learnable bias;
# 3. LongT5 local and transient-global attention at 16k tokens;
# 4. the FFN, the norm and the fused loss;
# 5. one patched transformers T5 v1.1-base training step against the unpatched model;
# 6. a one-GPU ZeRO-3 run of t5-base, with a DeepSpeed wheel carried in .whl/ when the machine has none.
set -uo pipefail

OUT="${OUT:-bench/results}"
mkdir -p "$OUT"
started=$(date +%s)
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.txt, note the outcome
    local name=$1 limit=$2
    shift 2
    local t0=$(date +%s)
    timeout --signal=TERM --kill-after=10 "$limit" "$@" > "$OUT/$name.txt" 2>&1
    local rc=$?
    echo "$name: exit $rc in $(( $(date +%s) - t0 )) s (limit $limit s)" | tee -a "$OUT/steps.txt"
    tail -n 8 "$OUT/$name.txt"
}

python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -n 3
if ! python3 -c "import deepspeed" 2>/dev/null && ls .whl/deepspeed-*.whl > /dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps .whl/deepspeed-*.whl 2>&1 | tail -n 3
fi
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python3 - <<'PY' > "$OUT/versions.txt" 2>&1
import importlib, torch, triton
print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)
for name in ("transformers", "deepspeed"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as err:  # noqa: BLE001 - a missing package is a line of the report
        print(name, "missing:", err)
PY
cat "$OUT/versions.txt"
tag="$(python3 -c 'import torch; print(torch.cuda.get_device_name().split()[1].lower())' 2>/dev/null || echo gpu)"

step pytest_cuda_${tag} 120 python3 -m pytest -q -m cuda tests -x -p no:cacheprovider
step bucketed_attention_${tag} 120 python3 bench/bench_bucketed_attention.py --lengths 512 2048 4096 \
    --out "$OUT/bucketed_attention_${tag}.csv"
step local_attention_${tag} 50 python3 bench/bench_local_attention.py --lengths 16384 \
    --out "$OUT/local_attention_${tag}.csv"
step ffn_${tag} 25 python3 bench/bench_ffn.py --out "$OUT/ffn_${tag}.csv"
step rms_norm_${tag} 15 python3 bench/bench_rms_norm.py --out "$OUT/rms_norm_${tag}.csv"
step cross_entropy_${tag} 25 python3 bench/bench_cross_entropy.py --out "$OUT/cross_entropy_${tag}.csv"
step train_${tag} 45 python3 bench/bench_train.py --models google/t5-v1_1-base --steps 10 --warmup 2 \
    --out "$OUT/train_${tag}.csv"
python3 -c "from fastseq.tokenizers import ByT5Tokenizer; ByT5Tokenizer().save_pretrained('$OUT/byt5_tokenizer')"
step zero3_t5_base_${tag} 45 deepspeed --num_gpus 1 --module fastseq.train \
    --deepspeed configs/deepspeed/zero3.json --model t5-base --tokenizer "$OUT/byt5_tokenizer" --steps 20 \
    --batch-size 8 --optimizer adamw --lr 1e-4 --quiet --eval-examples 0 --output-dir "$OUT/zero3_run"
cp "$OUT/zero3_run/metrics.jsonl" "$OUT/zero3_t5_base_${tag}.jsonl" 2>/dev/null
rm -rf "$OUT/zero3_run" "$OUT/byt5_tokenizer"  # the checkpoint itself is not a result
echo "gpu_check: $(( $(date +%s) - started )) s in all; steps in $OUT/steps.txt"
