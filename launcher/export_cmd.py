"""moelab-export: a run's DeepSpeed checkpoint (all EP ranks' experts) -> a Hugging Face folder.

moelab-export runs/moelab/<run> hf/<name>              # newest complete checkpoint
moelab-export runs/moelab/<run> hf/<name> --tag global_step500
moelab-export runs/moelab/<run> hf/<name> --bench      # then measure generate() tokens/s

Load it anywhere: AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).
"""

from __future__ import annotations

import argparse
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
    args = parser.parse_args(argv)
    from moelab.export import export

    try:
        out = export(args.run_dir, args.out_dir, tag=args.tag)
    except ValueError as err:
        print(f"moelab-export: {err}", file=sys.stderr)
        return 2
    print(f"moelab-export: wrote {out} (load with trust_remote_code=True)")
    if args.bench:
        from moelab.inference import format_throughput, generate_throughput

        print(format_throughput(generate_throughput(out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
