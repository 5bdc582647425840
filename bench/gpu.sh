#!/usr/bin/env bash
# On a machine with NVIDIA GPUs: ragq's worker pipeline against sentence-transformers fp16 on
# the same chunks, for all-MiniLM-L6-v2 and multilingual-e5-small (tokens/s and peak GPU
# memory, bench/ingest.py), then `ragq worker --gpus all` pinning (one process per GPU in
# nvidia-smi) and the CUDA-after-fork check (bench/gpu_fork_check.py). One run, one report:
#
#     bash bench/gpu.sh            # DOCS=400 pages, ROUNDS=2 per side
#
# It makes its own virtualenv (.venv-gpu) with a CUDA build of torch: an already installed
# CUDA torch is reused (--system-site-packages), else it comes from TORCH_INDEX_URL. Needs
# the JD Cloud corpus at ../shared/data and Redis (scripts/ensure_redis.py starts one).
set -euo pipefail
cd "$(dirname "$0")/.."
DOCS=${DOCS:-400}
ROUNDS=${ROUNDS:-2}
VENV=${VENV:-.venv-gpu}
TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cu128}
PY=${PYTHON:-$(command -v python3.11 || command -v python3)}

nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv
[ -x "$VENV/bin/python" ] || "$PY" -m venv --system-site-packages "$VENV"
if ! "$VENV/bin/python" -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  "$VENV/bin/pip" install -q torch --index-url "$TORCH_INDEX_URL"
fi
"$VENV/bin/pip" install -q -e ".[test]"
"$VENV/bin/python" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name(0), 'bf16', torch.cuda.is_bf16_supported())"
"$VENV/bin/python" scripts/ensure_redis.py

export RAGQ_DATA_DIR=${RAGQ_DATA_DIR:-$PWD/.ragq/data}
for model in sentence-transformers/all-MiniLM-L6-v2 intfloat/multilingual-e5-small; do
  echo "== $model: worker pipeline (RAGQ_DTYPE=${RAGQ_DTYPE:-auto}) vs sentence-transformers fp16"
  "$VENV/bin/python" bench/ingest.py --device cuda --model "$model" --docs "$DOCS" --rounds "$ROUNDS"
done

gpus=$(nvidia-smi -L | wc -l)
echo "== ragq worker --gpus all on $gpus GPU(s): one pool process per GPU"
log=$(mktemp)
RAGQ_KEY_PREFIX=ragq-gpu-check RAGQ_INGEST_QUEUE=gpu-check-ingest RAGQ_QA_QUEUE=gpu-check-qa \
  "$VENV/bin/python" -m producer worker --gpus all >"$log" 2>&1 &
worker=$!
for _ in $(seq 600); do
  [ "$(grep -c 'loaded embedding model' "$log")" -ge "$gpus" ] && break
  sleep 1
done
nvidia-smi --query-compute-apps=gpu_bus_id,pid,used_memory --format=csv
apps=$(nvidia-smi --query-compute-apps=gpu_bus_id --format=csv,noheader)
kill -TERM "$worker"; wait "$worker" || true
used=$(printf '%s\n' "$apps" | grep -c . || true)
distinct=$(printf '%s\n' "$apps" | grep . | sort -u | wc -l)
if [ "$used" -ne "$gpus" ] || [ "$distinct" -ne "$gpus" ]; then
  echo "FAIL: $used process(es) on $distinct of $gpus GPU(s); expected one per GPU"; exit 1
fi
echo "PASS: one worker process per GPU ($gpus)"

PYTHONPATH=. "$VENV/bin/python" bench/gpu_fork_check.py --kills 2
