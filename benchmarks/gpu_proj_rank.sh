#!/usr/bin/env bash
# Issue 9 item 2: is a low-rank Proj good enough?  Quality of SALAD with the full dim x dim Proj vs rank-r Projs
# on the testbed model (testbed/, dim 256, 6 blocks), same data, recipe and step count for every variant.
#
#   pairs   256 procedural clip pairs (bench_finetune.make_pairs: the same seeds, latent 16x16x32x32, as the
#           shipped fine-tuned file testbed/models/salad_testbed_wan21_topk90_finetuned.safetensors)
#   (a) full      calibrate-then-fine-tune, the shipped recipe: scripts/salad_finetune.py from the calibrated file
#                 testbed/models/salad_testbed_wan21_topk90.safetensors, SALAD top-k 90%, batch 8, lr 1e-3,
#                 shift 8, caption dropout 0.1, seed 0, no gradient checkpointing, $STEPS steps
#   (b, c) r64, r16  the same, from the calibrated file SVD-truncated to rank r (SaladWeights.to_low_rank; block
#                 5, which calibration left sparse-only, starts as a fresh rank-r Proj): the trainer makes rank-r
#                 weights.  r64 = dim/4 (2x cheaper Proj), r16 = dim/16 (8x cheaper; Wan-14B's r = 256 is
#                 dim/20, ~10x cheaper)
#   (d) svd_r64, svd_r16  (a) SVD-truncated to rank r, no training (the training-free compression of a file)
#   quality  benchmarks/bench_quality.py once per file (it takes one file per sparsity): 32 prompt x seed pairs,
#            20 steps, sparsity 0.9, start_percent 0 and 0.2, PSNR / SSIM vs dense (held-out prompts: seeds
#            training never used); the first run also scores sparse_topk (sparse-only, no weights)
#
# Writes into RESULTS (the lead tars it): proj_rank.json (one row per variant x start: psnr, ssim, adherence,
# rank, Proj cost vs full, training loss, SVD error), run.log, the five weight files (~1.6 MB full, less
# low-rank) and the quality JSONs (quality-<variant>.json).  Pairs and checkpoints stay in a scratch folder.
# Every step has its own `timeout`, cut to what is left of BUDGET (default 400 s).
#
# GPU machine (repo root; COMFYUI_DIR and PYTHONPATH set as for bench_quality.py, see its docstring), ~6 min:
#     bash benchmarks/gpu_proj_rank.sh $OUT/proj_rank
# CPU smoke (a handful of steps, tiny latents, torch backend; the whole path end to end, ~3 min on 2 cores):
#     bash benchmarks/gpu_proj_rank.sh /tmp/proj_rank_smoke --smoke
# Knobs (environment): STEPS (fine-tune steps of every variant, default 400; the shipped file had 677),
# RANKS (default "64,16"), BUDGET (seconds), PY, SCRATCH.
set -uo pipefail
RES=${1:?usage: gpu_proj_rank.sh RESULTS_DIR [--smoke]}
SMOKE=0
[ "${2:-}" = "--smoke" ] && SMOKE=1
cd "$(dirname "$0")/.."
mkdir -p "$RES"
RES=$(cd "$RES" && pwd)
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
RANKS=${RANKS:-64,16}
SCRATCH=${SCRATCH:-$(mktemp -d /tmp/salad_projrank.XXXXXX)}
export PYTHONUNBUFFERED=1
exec > >(tee -a "$RES/run.log") 2>&1

MODEL=testbed/models/salad_testbed_wan21.safetensors
CALIB=testbed/models/salad_testbed_wan21_topk90.safetensors
if [ "$SMOKE" = 1 ]; then
    STEPS=${STEPS:-4}; BUDGET=${BUDGET:-900}
    PAIRS=4; LF=4; LS=16; BATCH=2
    FT_EXTRA=(--device cpu --backend torch)
    QUALITY=(--pairs 2 --batch 2 --steps 2 --latent 16,4,16,16 --backend torch --starts 0)
    T_FT=240 T_Q1=150 T_Q=150
else
    STEPS=${STEPS:-400}; BUDGET=${BUDGET:-400}
    PAIRS=256; LF=16; LS=32; BATCH=8
    FT_EXTRA=(--backend auto)
    QUALITY=(--pairs 32 --starts 0,0.2)
    T_FT=80 T_Q1=75 T_Q=45
fi

source benchmarks/budget_step.sh   # step NAME LIMIT CMD...: timeout min(LIMIT, time left of BUDGET)

echo "=== gpu_proj_rank: $(date -u +%FT%TZ) smoke=$SMOKE steps=$STEPS ranks=$RANKS budget=${BUDGET}s scratch=$SCRATCH"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"

# pairs (the shipped recipe's: bench_finetune.make_pairs, same seeds) and the SVD-truncated calibrated inits
step "pairs + inits" 60 $PY - "$SCRATCH" "$PAIRS" "$LF" "$LS" "$CALIB" "$RANKS" <<'EOF'
import sys
from pathlib import Path
sys.path.insert(0, "benchmarks")
import torch
import bench_finetune as bf
from salad_pack.salad_core.weights import load_salad_weights, save_salad_weights
scratch, n, lf, ls, calib, ranks = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6]
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
bf.make_pairs(scratch / "pairs", n, lf, ls, device=dev)
w = load_salad_weights(calib)
for r in (int(x) for x in ranks.split(",") if x.strip()):
    low = w.to_low_rank(r)
    save_salad_weights(low, scratch / f"init_r{r}.safetensors")
    print(f"init r{r}: {low.metadata['proj_compression']}")
print(f"{n} pairs in {scratch / 'pairs'}")
EOF

finetune() {  # finetune NAME INIT
    local name=$1 init=$2
    step "fine-tune $name" "$T_FT" $PY scripts/salad_finetune.py --model "$MODEL" --data "$SCRATCH/pairs" \
        --out "$RES/ft_$name.safetensors" --ckpt "$SCRATCH/$name.ckpt" --captions testbed --steps "$STEPS" \
        --batch "$BATCH" --lr 1e-3 --sparsity 0.9 --pattern topk --shift 8 --cfg-dropout 0.1 --seed 0 \
        --log-every $(( STEPS / 8 > 0 ? STEPS / 8 : 1 )) --ckpt-every 0 --no-grad-checkpointing \
        --init-weights "$init" "${FT_EXTRA[@]}"
}
finetune full "$CALIB"
for r in ${RANKS//,/ }; do finetune "r$r" "$SCRATCH/init_r$r.safetensors"; done

# (d): the trained full file, SVD-truncated without training
if [ -f "$RES/ft_full.safetensors" ]; then
    step "svd of (a)" 60 $PY - "$RES" "$RANKS" <<'EOF'
import sys
from pathlib import Path
sys.path.insert(0, "tests")
from _pack import register
register()
from salad_pack.salad_core.weights import load_salad_weights, save_salad_weights
res, ranks = Path(sys.argv[1]), sys.argv[2]
w = load_salad_weights(res / "ft_full.safetensors")
for r in (int(x) for x in ranks.split(",") if x.strip()):
    low = w.to_low_rank(r)
    save_salad_weights(low, res / f"svd_r{r}.safetensors")
    print(f"svd_r{r}: {low.metadata['proj_compression']}")
EOF
fi

QARGS=(--sparsities 0.9 "${QUALITY[@]}" --model "$MODEL")
VARIANTS=(full)
for r in ${RANKS//,/ }; do VARIANTS+=("r$r"); done
for r in ${RANKS//,/ }; do VARIANTS+=("svd_r$r"); done
first=1
for v in "${VARIANTS[@]}"; do
    f="$RES/ft_$v.safetensors"
    [[ $v == svd_* ]] && f="$RES/$v.safetensors"
    if [ ! -f "$f" ]; then echo "=== quality $v: SKIPPED, $f was not written"; continue; fi
    methods=dense,salad_calibrated limit=$T_Q
    (( first )) && methods=dense,sparse_topk,salad_calibrated limit=$T_Q1
    step "quality $v" "$limit" $PY benchmarks/bench_quality.py --weights "$f" --methods "$methods" \
        --out "$SCRATCH/q_$v" "${QARGS[@]}" && first=0
    q=$(ls -t "$SCRATCH/q_$v"/quality-*.json 2>/dev/null | head -1)
    [ -n "$q" ] && cp "$q" "$RES/quality-$v.json"
done

# one JSON: a row per variant x start_percent, with rank, Proj cost and training loss
$PY - "$RES" "$SCRATCH" "$STEPS" "$RANKS" "$SMOKE" <<'EOF'
import json, sys
from pathlib import Path
sys.path.insert(0, "tests")
from _pack import register
register()
from salad_pack.salad_core.finetune import load_checkpoint
from salad_pack.salad_core.proj import proj_flops_ratio
from salad_pack.salad_core.weights import load_salad_weights
res, scratch, steps, ranks, smoke = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5] == "1"
variants = ["full"] + [f"r{r}" for r in ranks.split(",")] + [f"svd_r{r}" for r in ranks.split(",")]
out = dict(what="SALAD quality vs Proj rank on the testbed (dim 256): fine-tuned full / rank-r Proj (same recipe "
                "and steps, from the calibrated file or its SVD truncation) and the full one SVD-truncated without "
                "training; PSNR/SSIM vs dense, 0.9 top-k, held-out prompts",
           steps=steps, ranks=[int(r) for r in ranks.split(",")], smoke=smoke, variants={}, rows=[])
for v in variants:
    wf = res / (f"{v}.safetensors" if v.startswith("svd_") else f"ft_{v}.safetensors")
    qf = res / f"quality-{v}.json"
    info = dict(file=wf.name if wf.exists() else None)
    if wf.exists():
        w = load_salad_weights(wf)
        r = w.proj_rank
        info.update(rank=r, proj_cost_vs_full=proj_flops_ratio(w.dim, r), dim=w.dim,
                    proj_compression=w.metadata.get("proj_compression"), training_steps=w.metadata.get("training_steps"))
    ck = scratch / f"{v}.ckpt"
    if ck.exists():
        hist = [h[1] for h in load_checkpoint(ck)[0]["history"]]
        k = max(1, len(hist) // 10)
        info.update(loss_first_tenth=round(sum(hist[:k]) / k, 5), loss_last_tenth=round(sum(hist[-k:]) / k, 5))
    out["variants"][v] = info
    if qf.exists():
        q = json.loads(qf.read_text())
        info["quality_seconds"] = q.get("seconds_total")
        for row in q["rows"]:
            if row["method"] == "salad_calibrated":
                out["rows"].append(dict(variant=v, rank=info.get("rank"), start_percent=row["start_percent"],
                                        psnr=row["psnr"], ssim=row["ssim"], adherence=row["adherence"],
                                        psnr_std=row.get("psnr_std"), pairs=row["pairs"]))
            elif row["method"] == "sparse_topk" and row["sparsity"] > 0:
                out["rows"].append(dict(variant="sparse_only", rank=None, start_percent=row["start_percent"],
                                        psnr=row["psnr"], ssim=row["ssim"], adherence=row["adherence"],
                                        psnr_std=row.get("psnr_std"), pairs=row["pairs"]))
(res / "proj_rank.json").write_text(json.dumps(out, indent=1))
print("=== PSNR / SSIM vs dense (0.9 top-k):")
for row in sorted(out["rows"], key=lambda r: (r["start_percent"], r["variant"])):
    v = out["variants"].get(row["variant"], {})
    fmt = lambda x, n: "-" if x is None else f"{x:.{n}f}"
    print(f"  {row['variant']:<12} start={row['start_percent']:<4} rank={str(row['rank']):<5} "
          f"cost={fmt(v.get('proj_cost_vs_full'), 3):<6} PSNR {fmt(row['psnr'], 3):<7} SSIM {fmt(row['ssim'], 4):<7} "
          f"adherence {row['adherence']:.3f}  loss last tenth {v.get('loss_last_tenth', '-')}")
EOF
echo "=== done in ${SECONDS}s; results in $RES:"
ls -la "$RES"
