"""Compile every Triton kernel of the pack for an NVIDIA target on a machine WITHOUT a GPU and write a
fingerprint of the generated code, so a kernel change can be checked before GPU time is spent.

    python benchmarks/kernel_codegen.py --out /tmp/after.json [--arch 90] [--compare /tmp/before.json]

The Triton interpreter (what the CPU tests run) checks the kernels' results but not that they
compile: this script drives the real compiler (Triton's bundled ptxas) through a stand-in driver
that only names the target, calling the host wrappers in kernels/_triton_ops.py on small CPU
tensors (bf16, D=128 and 64, block 128) with every kernel path: TMA descriptors / pointer loads,
row map + bias, centroid compensation forward and backward, linear branch, selection.  Kernels
are compiled, never launched.  Per compiled kernel it records num_warps, num_stages, the shared
memory the compiler allocated and a histogram of the PTX instructions; --compare lists what
changed against an earlier fingerprint (a refactor that only moves code into @triton.jit helpers
should leave the tensor-core, load/store and exp2 counts and the shared memory unchanged).

It also runs the bundled ``ptxas -v`` on each kernel's PTX and records the registers per thread, the
spill bytes and ptxas' performance warnings (``C75xx``, e.g. C7513/C7514: wgmma instructions serialised,
which silently removes the tensor-core overlap a kernel was written for).  Registers decide how many
programs share an SM: the sparse forward's 255 (4 warps) allow two.  CODEGEN_DUMP_DIR=DIR also writes
each kernel's PTX there.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OP = re.compile(r"^\s*(?:@!?%?\w+\s+)?([a-z][\w.:]*)")
SKIP = ("//", ".loc", ".file", "$", "{", "}", ".reg", ".shared", ".local", ".section", ".b8", ".b16", ".b32", ".b64")


def _parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="fingerprint JSON to write")
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 90 (H100/H200)")
    ap.add_argument("--compare", default=None, help="an earlier fingerprint JSON: print the differences")
    return ap.parse_args()


def _install_driver(arch: int) -> list:
    """A stand-in driver naming the target, and warmup-only launches (compile, record, never run)."""
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    class TargetOnly:
        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_active_torch_device(self):
            return torch.device("cpu")

    driver.set_active(TargetOnly())
    compiled: list = []
    run = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kw):
        kernel = run(self, *args, grid=grid, warmup=True, **kw)
        compiled.append((self.fn.__name__, kernel))
        return kernel

    JITFunction.run = compile_only
    return compiled


def _cases(compiled: list) -> dict:
    import torch
    sys.path.insert(0, str(ROOT / "tests"))
    from _pack import register
    register()
    from salad_pack.kernels import _triton_ops as ops
    from salad_pack.kernels import num_blocks
    from salad_pack.kernels.options import TritonOptions

    torch.manual_seed(0)
    dt, L, blk = torch.bfloat16, 1000, 128
    nq = num_blocks(L, blk)

    def qkv(D=128):
        return [torch.randn(1, L, 2, D, dtype=dt).transpose(1, 2) for _ in range(3)]

    def lut(width):
        return (torch.arange(width, dtype=torch.int32).expand(1, 2, nq, width),
                torch.full((1, 2, nq), width, dtype=torch.int32))

    def fwd(tma=True, D=128, **kw):
        import triton
        q, k, v = qkv(D)
        configs = {}
        if kw.pop("tiled", False):      # config key Q_TILED: q read by TMA from a tile-ordered copy
            c = ops.config_for("fwd", D, dt, L)
            configs["fwd"] = triton.Config(dict(c.kwargs, Q_TILED=True), num_warps=c.num_warps,
                                           num_stages=c.num_stages)
            kw["q_tiled"] = q.transpose(1, 2).contiguous().transpose(1, 2)
        ops._sparse_fwd(q, k, v, *lut(nq), blk, 0.1, layout="blhd", opts=TritonOptions(tma=tma, configs=configs),
                        **kw)

    def gluon_ws(D=128, bn=64, mode=1):     # the experimental Gluon warp-specialised forward (config key GLUON_WS)
        from salad_pack.kernels import _gluon_ws
        q, k, v = qkv(D)
        o = torch.empty(1, L, 2, D, dtype=dt).transpose(1, 2)
        _gluon_ws.launch(q, k, v, o, torch.empty(1, 2, L), *lut(nq), torch.randperm(L), torch.randn(2 * D, dtype=dt),
                         0, torch.randn(1), blk, 0.1, block_n=bn, nbuf=2, accumulate=True, **_gluon_ws.MODES[mode])

    def bwd(tma=True, comp=False):
        q, k, v = qkv()
        o = torch.randn(1, 2, L, 128, dtype=dt)
        lse = torch.randn(1, 2, L)
        do = torch.randn(1, L, 2, 128, dtype=dt).transpose(1, 2)
        means = ops._comp_means(True, k, v, blk) if comp else None
        ops._sparse_bwd(q, k, v, o, lse, do, *lut(4 if comp else nq), blk, 0.1, means=means,
                        opts=TritonOptions(tma=tma))

    def linear():
        q, k, v = qkv()
        S, z = ops.linear_state(k, v)
        ops._linear_apply(q, S, z, 1e-5, "blhd")
        ops._linear_bwd(q, k, v, z, S, torch.randn(1, L, 2, 128, dtype=dt).transpose(1, 2), 1e-5)

    def passes(full=True):
        q, k, v = qkv()
        rm = torch.randperm(L)
        st = ops.kv_pass(k, v, rm, blk, full, full, full)[-1]
        ops.q_pass(q, rm, blk, st, 1e-5, torch.randn(1) if full else None, True)

    def select():
        q = qkv()[0]
        ops.pool_blocks(q, blk)
        ops.pool_blocks(q, blk, torch.randperm(L))
        ops.topk_lut(torch.randn(1, 2, 8, 8), 3)
        ops.token_mean(torch.randn(1, L, 1536, dtype=dt))

    cases = {
        "fwd_tma": lambda: fwd(), "fwd_ptr": lambda: fwd(tma=False), "fwd_d64": lambda: fwd(D=64),
        "fwd_comp": lambda: fwd(comp=True),
        "fwd_rowmap_bias": lambda: fwd(rowmap=torch.randperm(L), bias=torch.randn(1, 256)),
        "fwd_rowmap_bias_comp": lambda: fwd(rowmap=torch.randperm(L), bias=torch.randn(1, 256), comp=True),
        "fwd_rowmap_gated_bias": lambda: fwd(rowmap=torch.randperm(L), bias=torch.randn(256, dtype=dt),
                                             gate_logit=torch.randn(1)),
        "fwd_rowmap_tiled_gated_bias": lambda: fwd(tiled=True, rowmap=torch.randperm(L),
                                                   bias=torch.randn(256, dtype=dt), gate_logit=torch.randn(1)),
        "fwd_gluon_ws": gluon_ws, "fwd_gluon_ws_d64": lambda: gluon_ws(D=64),
        "fwd_gluon_ws_one_consumer": lambda: gluon_ws(mode=2), "fwd_gluon_ws_overlap": lambda: gluon_ws(mode=3),
        "fwd_gluon_ws_asym": lambda: gluon_ws(mode=4),
        "passes": passes, "passes_gather_pool": lambda: passes(False),
        "linear": linear, "bwd_tma": lambda: bwd(), "bwd_ptr": lambda: bwd(tma=False),
        "bwd_comp_tma": lambda: bwd(comp=True), "bwd_comp_ptr": lambda: bwd(tma=False, comp=True),
        "select": select,
    }
    out = {}
    for tag, fn in cases.items():
        n0 = len(compiled)
        fn()
        for name, kernel in compiled[n0:]:
            out[f"{tag}:{name}"] = _fingerprint(kernel)
            if os.environ.get("CODEGEN_DUMP_DIR"):      # the PTX itself, for reading a loop's schedule
                Path(os.environ["CODEGEN_DUMP_DIR"], f"{tag}-{name}.ptx").write_text(kernel.asm["ptx"])
    return out


def _ptxas_report(ptx: str, arch: int) -> dict:
    """registers, spill bytes and C75xx performance warnings from the bundled ``ptxas -v`` (empty when
    this Triton has no ptxas to run)."""
    import subprocess
    import tempfile
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        exe = get_ptxas(arch).path
    except Exception:
        return {}
    suffix = "a" if arch >= 90 else ""
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        r = subprocess.run([exe, "-v", f"--gpu-name=sm_{arch}{suffix}", str(src), "-o", str(Path(d) / "k.o")],
                           capture_output=True, text=True)
    text = r.stdout + r.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spill = re.search(r"(\d+) bytes spill stores", text)
    return dict(registers=int(regs.group(1)) if regs else None,
                spill_store_bytes=int(spill.group(1)) if spill else None,
                ptxas_warnings=sorted(set(re.findall(r"\((C75\d\d)\)", text))))


def _fingerprint(kernel) -> dict:
    ptx = kernel.asm["ptx"]
    hist: collections.Counter = collections.Counter()
    for line in ptx[ptx.find("{"):].splitlines():
        s = line.strip()
        if not s or s.startswith(SKIP) or s.endswith(":"):
            continue
        m = OP.match(s)
        if m:
            hist[m.group(1)] += 1
    md = kernel.metadata
    return dict(num_warps=md.num_warps, num_stages=md.num_stages, shared=md.shared, n_instr=sum(hist.values()),
                hist=dict(sorted(hist.items())), **_ptxas_report(ptx, md.target.arch))


def compare(before: dict, after: dict) -> list:
    """Lines naming what differs per kernel (meta data and instruction counts)."""
    lines = []
    for key in sorted(set(before) | set(after)):
        a, b = before.get(key), after.get(key)
        if a is None or b is None:
            lines.append(f"{key}: only in {'after' if a is None else 'before'}")
            continue
        # (fingerprints written before the ptxas report have no registers / spills / warnings: not compared)
        meta = {f: (a.get(f), b.get(f)) for f in ("num_warps", "num_stages", "shared", "registers",
                                                   "spill_store_bytes", "ptxas_warnings")
                if f in a and f in b and a[f] != b[f]}
        ops = sorted(op for op in set(a["hist"]) | set(b["hist"]) if a["hist"].get(op, 0) != b["hist"].get(op, 0))
        if not meta and not ops:
            lines.append(f"{key}: same")
            continue
        lines.append(f"{key}: {a['n_instr']} -> {b['n_instr']} instructions {meta or ''}")
        lines += [f"    {op:44s} {a['hist'].get(op, 0):5d} -> {b['hist'].get(op, 0):5d}" for op in ops]
    return lines


def main() -> None:
    args = _parse()
    os.environ.pop("TRITON_INTERPRET", None)
    import triton
    compiled = _install_driver(args.arch)
    result = {"triton": triton.__version__, "arch": args.arch, "kernels": _cases(compiled)}
    Path(args.out).write_text(json.dumps(result, indent=1, sort_keys=True))
    for key, r in result["kernels"].items():
        print(f"{key:52s} warps {r['num_warps']} stages {r['num_stages']} shared {r['shared']:6d} "
              f"instructions {r['n_instr']} registers {r.get('registers')} spill {r.get('spill_store_bytes')} "
              f"{' '.join(r.get('ptxas_warnings') or [])}")
    if args.compare:
        before = json.loads(Path(args.compare).read_text())
        print(f"\nagainst {args.compare} (triton {before.get('triton')}, sm{before.get('arch')}):")
        print("\n".join(compare(before["kernels"], result["kernels"])))


if __name__ == "__main__":
    main()
