#!/usr/bin/env python3
"""The two model runners side by side in one run: `cortexstream bench batched` (prefill and decode
tokens/s of N sequences decoded together) with --backend cpu and with --backend mlx, alternating
per N so both see the same machine load, and their ratios (mlx over cpu; above 1 means MLX is
faster).

The binary must be built with the MLX backend (CS_WITH_MLX=1 scripts/build.sh).

  python3 bench/bench_backends.py [--bin B] [--model M] [--npl 1,8] [--npp 64] [--ntg 16]
                                  [--repeats 1] [--precision int8]

--precision applies to the cpu backend (MLX multiplies in float32). Prints one JSON object.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_BIN = REPO / "build" / "src" / "cli" / "cortexstream"


def batched(args: argparse.Namespace, backend: str, n: int) -> dict:
    cmd = [args.bin, "bench", "batched", "--backend", backend, "--npl", str(n), "--npp",
           str(args.npp), "--ntg", str(args.ntg), "--repeats", str(args.repeats), "--json",
           "--precision", args.precision]
    if args.model:
        cmd += ["--model", args.model]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    r = json.loads(out)["results"][0]
    return {k: r[k] for k in ("n", "prefill_tokens_per_s", "decode_tokens_per_s",
                              "total_tokens_per_s")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", default=str(DEFAULT_BIN))
    ap.add_argument("--model", default=None)
    ap.add_argument("--npl", default="1,8", help="sequence counts, comma-separated")
    ap.add_argument("--npp", type=int, default=64, help="prompt tokens per sequence")
    ap.add_argument("--ntg", type=int, default=16, help="tokens generated per sequence")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--precision", default="int8", choices=["int8", "f32"])
    args = ap.parse_args()
    help_text = subprocess.run([args.bin, "bench", "batched", "--help"], capture_output=True,
                               text=True).stdout
    if "mlx (MLX; in this build)" not in help_text:
        print(f"{args.bin} has no MLX backend: build it with CS_WITH_MLX=1 scripts/build.sh",
              file=sys.stderr)
        return 2
    report = {"bench": "backends", "date": datetime.date.today().isoformat(),
              "host": {"cpu": platform.processor() or platform.machine(),
                       "cores": os.cpu_count()},
              "config": vars(args), "results": []}
    for n in (int(x) for x in args.npl.split(",")):
        cpu = batched(args, "cpu", n)
        mlx = batched(args, "mlx", n)
        report["results"].append({
            "n": n, "cpu": cpu, "mlx": mlx,
            "mlx_over_cpu": {k: round(mlx[k] / cpu[k], 4) for k in
                             ("prefill_tokens_per_s", "decode_tokens_per_s",
                              "total_tokens_per_s")}})
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
