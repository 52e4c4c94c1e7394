# Sourced by the GPU scripts (gpu_finetune_quality.sh, gpu_proj_rank.sh): `step NAME LIMIT CMD...` runs CMD
# under `timeout min(LIMIT, seconds left of $BUDGET)`, prints its start, time and status (TIMED OUT for 124 /
# 137), and skips it when under 10 s are left.  Needs BUDGET (seconds for the whole script; bash's SECONDS
# counts from the script's start).
left() { echo $(( BUDGET - SECONDS )); }
step() {
    local name=$1 limit=$2; shift 2
    local l; l=$(left)
    (( l < limit )) && limit=$l
    if (( limit < 10 )); then echo "=== $name: SKIPPED, only ${l}s of the ${BUDGET}s budget left"; return 1; fi
    echo "=== $name: start at ${SECONDS}s, limit ${limit}s"
    local t0=$SECONDS
    timeout --kill-after=5 "$limit" "$@"
    local rc=$?
    echo "=== $name: rc $rc after $(( SECONDS - t0 ))s (total ${SECONDS}s)$( ((rc == 124 || rc == 137)) && echo ' TIMED OUT')"
    return $rc
}
