"""moelab-export: a run's DeepSpeed checkpoint (all EP ranks' experts) -> a Hugging Face folder.

moelab-export runs/moelab/<run> hf/<name>              # newest complete checkpoint
moelab-export runs/moelab/<run> hf/<name> --tag global_step500
moelab-export runs/moelab/<run> hf/<name> --bench      # then measure generate() tokens/s
moelab-export runs/moelab/<run> hf/<name> --format native   # Llama/Mixtral/OLMo, or refuse

--format auto (default) writes transformers' own class (Llama, Mixtral, OLMo) when the model is
exactly one, else the self-contained folder loaded with trust_remote_code=True.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moelab-export", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a moelab run directory with checkpoints/")
    parser.add_argument("out_dir", type=Path, help="the save_pretrained folder to write")
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: the newest)")
    parser.add_argument(
        "--bench", action="store_true", help="measure generate() tokens/s at batch 1 and 16"
    )
    parser.add_argument(
        "--format",
        dest="fmt",
        choices=("auto", "native", "remote"),
        default="auto",
        help="native: transformers' own class (refused when not exact); remote: "
        "trust_remote_code folder; auto: native when exact (default)",
    )
    args = parser.parse_args(argv)
    from moelab.export import EXPORT_INFO, export

    try:
        out = export(args.run_dir, args.out_dir, tag=args.tag, fmt=args.fmt)
    except ValueError as err:
        print(f"moelab-export: {err}", file=sys.stderr)
        return 2
    info = json.loads((out / EXPORT_INFO).read_text())
    load = "no remote code" if info["format"] == "native" else "trust_remote_code=True"
    print(
        f"moelab-export: wrote {out} as {info['format']} {info['architecture']} "
        f"(load with {load}): {info['reason']}"
    )
    if args.bench:
        from moelab.inference import format_throughput, generate_throughput

        print(format_throughput(generate_throughput(out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
