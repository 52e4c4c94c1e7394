#!/usr/bin/env bash
# One GPU call of speed measurements (issues 9 and 13), run from the repository root on the GPU machine:
#   PART=s1 bash benchmarks/gpu_speed_suite.sh   (1.3B: before/after the refactor, size x batch table, kernels)
#   PART=s2 bash benchmarks/gpu_speed_suite.sh   (LTX-Video 13B family timing, Wan 14B 480p)
#   PART=p2 bash benchmarks/gpu_speed_suite.sh   (FP8: GPU tests, kernel sweep, per-layer, 1.3B and 14B forwards)
#   PART=p1 bash benchmarks/gpu_speed_suite.sh   (issue 9 wave 3: GPU tests of the inference passes, the per-layer
#                                                profile before/after, 1.3B forward before/after)
#   PART=p3 bash benchmarks/gpu_speed_suite.sh   (issue 9 wave 4, the sparse kernel's new inner loop: GPU tests,
#                                                fwd config sweep, per-layer profile before/after)
#   PART=p4 bash benchmarks/gpu_speed_suite.sh   (wave 4: 1.3B forwards before/after, batch 1 and 2, 14B 480p,
#                                                per-layer GPU time with the host kept ahead, kernel table)
#   PART=p5 bash benchmarks/gpu_speed_suite.sh   (wave 4: the 1.3B size x batch table, FP8 vs bf16 at 480p)
#   PART=p6 bash benchmarks/gpu_speed_suite.sh   (wave 4: 720p forwards, Wan 14B and 1.3B)
#   PART=p9 bash benchmarks/gpu_speed_suite.sh   (wave 6: Nsight Compute counters of one 1.3B/14B 480p call, bf16
#                                                and FP8; the 17-frame forwards again)
#   PART=p10 bash benchmarks/gpu_speed_suite.sh  (wave 6: GPU tests of fp8_proj and the q_pass variants, the pass
#                                                sweep with them, per-layer bf16 vs fp8_proj at 1.3B/14B)
#   PART=p11 bash benchmarks/gpu_speed_suite.sh  (wave 6: forwards with the new q_pass config, bf16 vs fp8_proj:
#                                                1.3B 480p batch 1/2, Wan 14B 480p and 720p; the row-quantiser test)
#   PART=p12 bash benchmarks/gpu_speed_suite.sh  (wave 6, final tree: the GPU test suite, kernel table, per-layer
#                                                profile with parts at 1.3B/14B 480p and 21x30x30)
#   PART=p13 bash benchmarks/gpu_speed_suite.sh  (wave 6's last additions: linear_fp8 and the _scaled_mm probe on
#                                                the GPU, fp8_proj through a real server with partial loading; the
#                                                server part ran in wave 8: benchmarks/results/wave8/)
#   PART=p22 bash benchmarks/gpu_speed_suite.sh  (the experimental Gluon warp-specialised forward (fwd config key
#                                                GLUON_WS, mode 4; modes 1-3 ran on 2026-11-29, wave9): GPU
#                                                tests against the torch reference, sweep beside the table at
#                                                1.3B/14B 480p and 480x480, 90/95%, rows written as they go; 1.3B
#                                                480p forward with it)
#   PART=p23 bash benchmarks/gpu_speed_suite.sh  (Wan 14B 480p and 720p forwards at 90%, bf16 and fp8_proj, 2 timed
#                                                forwards each: the final tree's 14B rows)
#   PART=p24 bash benchmarks/gpu_speed_suite.sh  (kv_pass WAVE_FIT: the pass tests, then the table's kv_pass with and
#                                                without it at batch 1/2 on five Wan shapes; P24_SWEEP=1: the sweep
#                                                with 132/264 programs beside 528 that led to it)
#   PART=p15 bash benchmarks/gpu_speed_suite.sh  (a whole-tree check: the pass/gate GPU tests, 1.3B 480p forwards
#                                                batch 1/2 bf16 vs fp8_proj, fp8_proj through a real server (full
#                                                and partial load), kernels)
#   PART=p8 bash benchmarks/gpu_speed_suite.sh   (wave 5: the rows wave 4 left open with the kept loop: Wan 14B 720p
#                                                at 90/95% with 2 timed forwards, 14B 720p with a rank-256 Proj,
#                                                1.3B 720p batch 2, FP8 vs bf16)
#   (parts p14 and p16-p21, waves 7 and 8: the warp-specialised forward, kv_pass's STATE_APART, the token-mean
#   sweep, ran at commit fb4ea8f; WS and STATE_APART lost and were removed; results in benchmarks/results/wave8/)
# Needs COMFYUI_DIR (a ComfyUI source tree; the server steps also need ComfyUI's py3.12 wheels on PYTHONPATH, e.g.
# .whlsrv/ plus einops: av, pydantic, torchsde, ...); writes logs and JSON under $OUT/work and packs them into
# $OUT/<part>.tgz (the device returns at most 8 files).  Each step has its own timeout so one overrun
# cannot eat the rest.  .before/ is `git archive` of an earlier tree (kernels, salad_core, nodes,
# tests/_pack.py, comfy_harness.py, make_fixtures.py, bench_e2e.py, bench_quality.py: for s1/s2 the commit
# before the kernel/patch refactor, 95dea79; for p1 the commit before the inference passes, 395be3f; for p3/p4
# the commit before the new sparse loop, 59b4c7d, with profile_layer.py), so
# "before" and "after" run in the same call on the same card.
set -u
W=$OUT/work; mkdir -p "$W"
export PYTHONUNBUFFERED=1
step() { local t=$1 name=$2; shift 2; echo "== $name ($(date +%T))"; timeout "$t" "$@" >"$W/$name.log" 2>&1;
         echo "   rc=$? $(tail -1 "$W/$name.log")"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$W/card.txt"
case "${PART:-s1}" in
p22)
  step 200 gpu-tests python3 -m pytest -v -s tests/test_kernels.py -k "gluon_ws and asym"
  if ! grep -q " passed" "$W/gpu-tests.log" || grep -qE "[0-9]+ (failed|error)" "$W/gpu-tests.log"; then
    echo "   the Gluon tests did not all pass: no sweep; the table's forward at batch 1 and 2 instead"
    step 200 e2e-1.3b python3 benchmarks/bench_e2e.py --model 1.3b --sizes 480p --batches 1,2 --no-layers \
         --rep-ms 800 --sparsities 0.9 --precisions bf16 --out "$W/e2e13"
  else
    step 170 sweep-fwd python3 benchmarks/sweep_fwd.py --out "$W/sweep-fwd" --shapes 1.3b-480p,14b-480p,1.3b-sq480 \
         --sparsities 0.9,0.95 --variants 0,9,16,17,18 --budget-s 150
    step 200 e2e-1.3b python3 benchmarks/bench_e2e.py --model 1.3b --sizes 480p --batches 1 --no-layers \
         --rep-ms 800 --sparsities 0.9 --precisions bf16 \
         --fwd-configs "${FWD_CONFIGS:-table,GLUON_WS=4,GLUON_WS=4+BLOCK_N=128}" --out "$W/e2e13"
  fi ;;
p24)
  if [ -n "${P24_SWEEP:-}" ]; then
    step 120 sweep-kv python3 benchmarks/sweep_passes.py --out "$W/sweep" --shapes 1.3b-480p,14b-480p,1.3b-sq480 \
         --kinds kv_pass --budget-s 90
  else
    step 70 gpu-tests python3 -m pytest -q tests/test_passes.py
    step 80 wave-check python3 benchmarks/sweep_passes.py --out "$W/wave" --kinds "" --wave-check \
         --shapes 1.3b-480p,1.3b-sq480,14b-480p,14b-720p,1.3b-480p17
  fi ;;
p23)
  step 230 e2e-14b python3 benchmarks/bench_e2e.py --model 14b --sizes 480p --no-layers --iters 2 \
       --sparsities 0.9 --precisions bf16,fp8_proj --out "$W/e2e14"
  step 260 e2e-14b-720p python3 benchmarks/bench_e2e.py --model 14b --sizes 720p --no-layers --iters 2 \
       --sparsities 0.9 --precisions bf16,fp8_proj --out "$W/e2e14h" ;;
p15)
  step 100 gpu-tests python3 -m pytest -q tests/test_passes.py tests/test_salad_core_gpu.py -k "pass or inference or gate"
  step 150 e2e-1.3b python3 benchmarks/bench_e2e.py --model 1.3b --sizes 480p --batches 1,2 --no-layers \
       --rep-ms 800 --sparsities 0.9 --precisions bf16,fp8_proj --out "$W/e2e13"
  step 200 server python3 benchmarks/gpu_server_check.py --model 1.3b --modes full,partial --out "$W/server" \
       --budget-s 180
  step 100 kernels python3 benchmarks/bench_kernels.py --quick --budget-s 85 --out "$W/kernels" ;;
p13)
  step 120 gpu-tests python3 -m pytest -q -s tests/test_fp8.py tests/test_salad_core_gpu.py -k "fp8 or accumulates or rows"
  step 300 server python3 benchmarks/gpu_server_check.py --model 1.3b --modes full,partial --out "$W/server" \
       --budget-s 270
  step 150 gpu-tests-rest python3 -m pytest -q tests/test_passes.py tests/test_kernels.py -k "pass or rowmap or accum" ;;
p12)
  step 260 gpu-tests python3 -m pytest -q tests/test_kernels.py tests/test_passes.py tests/test_compensation.py \
       tests/test_salad_core_gpu.py tests/test_fp8.py tests/test_proj.py
  step 100 kernels python3 benchmarks/bench_kernels.py --quick --budget-s 85 --out "$W/kernels"
  step 110 profile python3 benchmarks/profile_layer.py --out "$W/profile" --models 1.3b,14b --grids 480p,sq480 \
       --sparsities 0.9 --budget-s 90 ;;
p11)
  step 60 gpu-tests python3 -m pytest -q -s tests/test_fp8.py tests/test_salad_core_gpu.py \
       -k "rows or fp8_proj or accumulates"
  step 100 e2e-1.3b python3 benchmarks/bench_e2e.py --model 1.3b --sizes 480p --batches 1,2 --no-layers \
       --rep-ms 800 --sparsities 0.9 --precisions bf16,fp8_proj --out "$W/e2e13"
  step 160 e2e-14b python3 benchmarks/bench_e2e.py --model 14b --sizes 480p --no-layers --iters 2 \
       --sparsities 0.9 --precisions bf16,fp8_proj --out "$W/e2e14"
  step 200 e2e-14b-720p python3 benchmarks/bench_e2e.py --model 14b --sizes 720p --no-layers --iters 2 \
       --sparsities 0.9 --precisions bf16,fp8_proj --out "$W/e2e14h" ;;
p10)
  step 200 gpu-tests python3 -m pytest -q tests/test_fp8.py tests/test_passes.py tests/test_salad_core_gpu.py \
       -k "fp8 or q_pass or accumulates or passes or inference"
  step 150 sweep-passes python3 benchmarks/sweep_passes.py --out "$W/sweep" --shapes 1.3b-480p,14b-480p \
       --budget-s 130
  step 150 profile python3 benchmarks/profile_layer.py --out "$W/profile" --models 1.3b,14b --grids 480p,720p \
       --sparsities 0.9 --precisions bf16,fp8_proj --no-parts --budget-s 120 ;;
p9)
  NCU="ncu --profile-from-start off --clock-control none --set detailed --metrics \
sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active,sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active"
  step 240 ncu $NCU -f -o "$W/ncu" python3 benchmarks/ncu_layer.py --shapes 1.3b-480p,14b-480p
  step 60 ncu-raw ncu --import "$W/ncu.ncu-rep" --page raw --csv
  step 30 ncu-sum python3 benchmarks/ncu_layer.py --summarize "$W/ncu-raw.log" --out "$W/ncu-summary.json"
  step 60 ncu-details ncu --import "$W/ncu.ncu-rep" --page details
  rm -f "$W/ncu.ncu-rep"
  step 150 e2e-17 python3 benchmarks/bench_e2e.py --model 1.3b --sizes 480p17,480p33 --batches 1,2 --rep-ms 1500 \
       --out "$W/e2e17" ;;
p5)
  step 330 e2e-1.3b python3 benchmarks/bench_e2e.py --model 1.3b --batches 1,2 --rep-ms 600 \
       --sizes 480p,sq480,sq624,portrait,480p17,480p33,480p49,480p121,720p --out "$W/e2e"
  step 60 fp8 python3 benchmarks/bench_fp8.py --shapes wan1.3b_480p --budget-s 45 --out "$W/fp8.json" ;;
p8)
  step 170 e2e-14b-720p python3 benchmarks/bench_e2e.py --model 14b --sizes 720p --no-layers --iters 2 \
       --out "$W/e2e14"
  step 120 e2e-14b-720p-r256 python3 benchmarks/bench_e2e.py --model 14b --sizes 720p --no-layers --iters 2 \
       --sparsities 0.9 --proj-rank 256 --out "$W/e2e14r"
  step 90 e2e-1.3b-720p-b2 python3 benchmarks/bench_e2e.py --model 1.3b --sizes 720p --batches 1,2 --no-layers \
       --iters 2 --sparsities 0.9 --out "$W/e2e13"
  step 60 fp8 python3 benchmarks/bench_fp8.py --shapes wan1.3b_480p --budget-s 45 --out "$W/fp8.json" ;;
p6)
  step 200 e2e-14b-720p python3 benchmarks/bench_e2e.py --model 14b --sizes 720p --no-layers --iters 1 \
       --sparsities 0.9 --out "$W/e2e14"
  step 75 e2e-1.3b-720p python3 benchmarks/bench_e2e.py --model 1.3b --sizes 720p --no-layers --iters 2 \
       --out "$W/e2e13" ;;
p3)
  step 240 gpu-tests python3 -m pytest -q tests/test_kernels.py tests/test_passes.py tests/test_compensation.py \
       tests/test_salad_core_gpu.py tests/test_fp8.py
  step 90 sweep-fwd python3 benchmarks/sweep_fwd.py --out "$W/sweep" --shapes 1.3b-480p,14b-720p,1.3b-480p33 \
       --budget-s 80
  step 220 profile python3 benchmarks/profile_layer.py --before .before --out "$W/profile" \
       --models 1.3b,14b --grids sq480,al18k,480p,720p --budget-s 190 ;;
p4)
  step 60 gpu-tests python3 -m pytest -q tests/test_compensation.py
  step 70 e2e-before python3 .before/benchmarks/bench_e2e.py --model 1.3b --sizes 480p --no-layers --rep-ms 800 \
       --out "$W/before"
  step 110 e2e-after python3 benchmarks/bench_e2e.py --model 1.3b --sizes 480p --batches 1,2 --no-layers \
       --rep-ms 800 --out "$W/after"
  step 130 e2e-14b python3 benchmarks/bench_e2e.py --model 14b --sizes 480p --no-layers --iters 2 \
       --sparsities 0.9 --out "$W/e2e14"
  step 80 profile python3 benchmarks/profile_layer.py --out "$W/profile" --models 1.3b \
       --grids 480p33,sq480,al18k,480p --budget-s 60
  step 100 kernels python3 benchmarks/bench_kernels.py --quick --budget-s 85 --out "$W/kernels" ;;
p2)
  step 90 gpu-tests python3 -m pytest -q tests/test_fp8.py tests/test_salad_core_gpu.py -k "fp8 or triton_matches"
  step 150 fp8 python3 benchmarks/bench_fp8.py --sweep --budget-s 125 --out "$W/fp8.json"
  step 60 profile python3 benchmarks/profile_layer.py --out "$W/profile" --models 1.3b,14b --grids 480p,sq480 \
       --sparsities 0.9
  step 70 e2e-1.3b python3 benchmarks/bench_e2e.py --model 1.3b --sizes 480p --no-layers --rep-ms 800 \
       --precisions bf16,fp8 --out "$W/e2e13"
  step 200 e2e-14b python3 benchmarks/bench_e2e.py --model 14b --sizes 480p,720p --no-layers --iters 2 \
       --sparsities 0.9 --precisions bf16,fp8 --out "$W/e2e14" ;;
p1)
  step 240 gpu-tests python3 -m pytest -q -x tests/test_passes.py tests/test_salad_core_gpu.py ${FP8_TESTS:-}
  step 200 profile python3 benchmarks/profile_layer.py --before .before --out "$W/profile" \
       --models 1.3b,14b --grids 480p17,480p33,sq480,al18k,480p,al480
  step 80 e2e-before python3 .before/benchmarks/bench_e2e.py --model 1.3b --sizes 480p,sq480 --no-layers \
       --rep-ms 800 --out "$W/before"
  step 80 e2e-after python3 benchmarks/bench_e2e.py --model 1.3b --sizes 480p,sq480 --no-layers \
       --rep-ms 800 --out "$W/after" ;;
s1)
  step 70 e2e-before python3 .before/benchmarks/bench_e2e.py --model 1.3b --sizes 480p,sq480 --no-layers \
       --rep-ms 800 --out "$W/before"
  step 70 e2e-after python3 benchmarks/bench_e2e.py --model 1.3b --sizes 480p,sq480 --no-layers \
       --rep-ms 800 --out "$W/after"
  step 285 e2e-1.3b python3 benchmarks/bench_e2e.py --model 1.3b --batches 1,2 --rep-ms 800 \
       --sizes 480p,sq480,sq624,portrait,480p17,480p33,480p49,480p121,720p --out "$W/e2e"
  step 140 kernels python3 benchmarks/bench_kernels.py --quick --out "$W/kernels" ;;
s2)
  step 110 family python3 benchmarks/bench_family.py --out "$W/family-ltxv13b.json"
  step 150 e2e-14b python3 benchmarks/bench_e2e.py --model 14b --sizes 480p --batches 1 --iters 3 \
       --out "$W/e2e14" ;;
esac
tar czf "$OUT/${PART:-s1}.tgz" -C "$W" .
ls -la "$OUT"
