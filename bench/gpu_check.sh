#!/usr/bin/env bash
# Everything a lent GPU machine is for, in one call: install the project, run the CUDA tests,
# run the benchmarks, and leave logs and CSVs under $OUT (bench/results when run by hand).
#
#     bash bench/gpu_check.sh
set -uo pipefail

OUT="${OUT:-bench/results}"
mkdir -p "$OUT"
python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -n 3

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python3 - <<'PY' > "$OUT/versions.txt"
import torch, triton
print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)
PY
cat "$OUT/versions.txt"
tag="$(python3 -c 'import torch; print(torch.cuda.get_device_name().split()[1].lower())' 2>/dev/null || echo gpu)"

status=0
python3 -m pytest -q -m cuda tests 2>&1 | tee "$OUT/pytest_cuda_${tag}.txt" | tail -n 15 || status=1
# Every benchmark (kernels and end-to-end training, torch.compile included), CSVs + plots + table in $OUT.
# The training list holds the fastseq.patch target: transformers T5 v1.1-base, 512 / 128 tokens, bf16.
fastseq bench --compile --out "$OUT" 2>&1 | tee "$OUT/bench_${tag}.txt" | tail -n 60 || status=1
# DeepSpeed ZeRO-3 on this one GPU: t5-3b (random weights, the synthetic task), tokens/s and peak memory per step.
python3 -c "from fastseq.tokenizers import ByT5Tokenizer; ByT5Tokenizer().save_pretrained('$OUT/byt5_tokenizer')"
deepspeed --num_gpus 1 --module fastseq.train --deepspeed configs/deepspeed/zero3.json --model t5-3b \
    --tokenizer "$OUT/byt5_tokenizer" --steps 30 --batch-size 8 --optimizer adamw --lr 1e-4 --quiet \
    --output-dir "$OUT/zero3_t5_3b_${tag}" 2>&1 | tail -n 5 || status=1
cp "$OUT/zero3_t5_3b_${tag}/metrics.jsonl" "$OUT/zero3_t5_3b_${tag}.jsonl" 2>/dev/null
rm -rf "$OUT/zero3_t5_3b_${tag}"  # the 3B checkpoint itself is not a result
exit $status
