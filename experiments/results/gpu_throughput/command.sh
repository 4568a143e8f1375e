# Run on one NVIDIA H200 lent for this session (2026-11-28; its image's torch 2.11.0+cu130,
# transformers 5.17.0, driver 580.159.04), from the repository root, code at the commit that adds
# this file. --memory-cap-gib 74.5 (= 80 GB) makes the grid show what fits on an 80 GB H100.
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
python3 experiments/bench/gpu_throughput.py --micro-batches 2 4 8 16 24 --memory-cap-gib 74.5 \
    --budget-s 390 --out gpu_throughput.json 2>&1 | tee gpu_throughput.txt
