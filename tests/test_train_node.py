"""SALAD Train Weights inside a real headless ComfyUI (CPU), issue 15: it never hands back weights that are
worse than none, says so plainly (report output, UI text, log), writes no file when nothing improved, and
refuses a latent whose recordings would not fit in RAM before sampling."""
import json
import math
import re
import uuid

import psutil
import pytest

from comfy_harness import execution_error, status_str
from graphs import t2v_prompt

T2V = "wan21_t2v_tiny.safetensors"


def _uniq(prefix):
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def _train_prompt(prefix, *, lr=1e-3, train_steps=40, samples_per_block=4, use_weights=True, sample=True):
    p = t2v_prompt(T2V, steps=2, prefix=_uniq("trained"))
    p["60"] = {"class_type": "SALADTrainWeights", "inputs": {
        "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "seed": 3,
        "record_steps": 4, "cfg": 3.0, "sampler_name": "euler", "scheduler": "simple", "sparsity": 0.9,
        "pattern": "topk", "samples_per_block": samples_per_block, "train_steps": train_steps,
        "learning_rate": lr, "filename_prefix": prefix}}
    p["4"]["inputs"].update(height=32, width=32)     # 1280 tokens = 10 blocks of 128: real sparsity
    if not sample:
        del p["6"], p["7"]
        return p
    p["5"] = {"class_type": "SALADApplyAttention", "inputs": dict(
        model=["1", 0], sparsity=0.9, pattern="topk", start_percent=0.0, end_percent=1.0, dense_blocks="",
        backend="auto", min_tokens=0, verbose=True)}
    if use_weights:
        p["5"]["inputs"]["salad_weights"] = ["60", 0]
    p["6"]["inputs"]["model"] = ["5", 0]
    return p


def _run_ok(server, prompt):
    entry = server.run(prompt)
    err = execution_error(entry)
    assert status_str(entry) == "success", (err or {}).get("exception_message", err) if err else entry.get("status")
    return entry


def _errors(report):
    m = re.search(r"sparse-only ([0-9.]+) -> SALAD ([0-9.]+)", report)
    assert m, report
    return float(m.group(1)), float(m.group(2))


def test_no_gain_keeps_sparse_only_warns_and_writes_no_file(comfy_server):
    """Training that cannot help (one step at a negligible learning rate: the trained weights equal the
    zero ones) ends with every block sparse-only, a plain warning in the report, the UI text and the log,
    no file, and a None salad_weights that Apply SALAD Attention takes as 'no weights'."""
    prefix = _uniq("nogain")
    mark = len(comfy_server.log())
    entry = _run_ok(comfy_server, _train_prompt(prefix, lr=1e-6, train_steps=1))
    report = entry["outputs"]["60"]["text"][0]
    print(report)
    assert report.startswith("WARNING: SALAD training did not help") and "NO weight file" in report
    assert "no gain: kept sparse-only for 2 of 2 blocks" in report
    assert "saved to" not in report and "% lower" not in report
    before, after = _errors(report)
    assert before == after and 0 < before < 1
    assert not list(comfy_server.salad_dir.glob(prefix + "*")) and not list(comfy_server.salad_dir.glob(".*.tmp"))
    log = comfy_server.log()[mark:]
    assert re.search(r"WARNING.*SALAD Train Weights: WARNING: SALAD training did not help", log) or \
        "SALAD Train Weights: WARNING: SALAD training did not help" in log
    # the sampler downstream ran sparse-only (weights None -> no weights)
    assert "weights none: sparse-only" in log


def test_random_tiny_wan_never_hands_back_worse_weights(comfy_server):
    """A random-weight model has no long-range structure for the linear branch to learn: whatever training
    does, the output is never worse than sparse-only on held-out calls, the report says which blocks kept
    their weights, and a saved file covers exactly those blocks with their before/after errors."""
    prefix = _uniq("tiny")
    entry = _run_ok(comfy_server, _train_prompt(prefix))
    report = entry["outputs"]["60"]["text"][0]
    print(report)
    before, after = _errors(report)
    assert 0 < before < 1 and after <= before
    assert "% lower" not in report and not re.search(r"by -", report)
    rows = dict(re.findall(r"(\d+): [0-9.]+ -> [0-9.]+ (kept|sparse-only)", report))
    assert set(rows) == {"0", "1"}
    kept = sorted(int(b) for b, what in rows.items() if what == "kept")
    files = list(comfy_server.salad_dir.glob(prefix + "*.safetensors"))
    if not kept:
        assert report.startswith("WARNING") and not files
        return
    assert "better by" in report.splitlines()[0] and len(files) == 1
    saved = re.search(r"saved to (\S+\.safetensors)", report).group(1)
    assert saved == str(files[0])
    from safetensors import safe_open
    with safe_open(saved, "pt") as f:
        meta = f.metadata()
    from salad_pack.salad_core.weights import parse_block_spec
    assert parse_block_spec(meta["blocks"]) == kept
    errs = json.loads(meta["block_errors"])
    assert set(errs) == {"0", "1"} and all(errs[str(b)][1] < errs[str(b)][0] for b in kept)
    assert meta["training_steps"] == "40" and meta["sparsity"] == "0.9" and meta["pattern"] == "topk"
    assert "recorded in ComfyUI" in meta["training_data"] and meta["num_blocks"] == "2"
    # the saved file loads through the loader node and runs
    _run_ok(comfy_server, t2v_prompt(T2V, steps=2, salad={"sparsity": 0.9}, weights_name=files[0].name,
                                     prefix=_uniq("use_trained")))


def test_latent_too_big_for_ram_is_refused_before_sampling(comfy_server):
    """A latent whose recordings would need several times the free RAM is refused with a clear node error
    naming the latent and a size to use instead; nothing is recorded (it fails in well under a second of
    sampling) and the server keeps serving."""
    spb, blocks, dim, batch = 64, 2, 256, 2
    per_token = (3 * dim + dim) * 2 * batch * blocks * spb          # fp16 q, k, v, x per recorded call
    target = 4 * psutil.virtual_memory().available // per_token
    frames = math.ceil(target / (128 * 128))
    if frames > 64:
        pytest.skip("this machine has more free RAM than the largest test latent can exceed")
    p = _train_prompt(_uniq("huge"), samples_per_block=spb, sample=False)
    p["4"]["inputs"].update(frames=frames, height=256, width=256)
    mark = len(comfy_server.log())
    entry = comfy_server.run(p)
    assert status_str(entry) == "error"
    err = execution_error(entry)
    msg = err["exception_message"]
    print(msg)
    assert err["node_type"] == "SALADTrainWeights" and "Traceback" not in msg
    assert f"latent {frames}x256x256" in msg and "frames x height x width" in msg and "of RAM" in msg
    assert re.search(r"Use a smaller latent, at most \d+x\d+x\d+", msg)
    assert "SALAD stats" not in comfy_server.log()[mark:]   # no sampling ran
    assert comfy_server.alive()
