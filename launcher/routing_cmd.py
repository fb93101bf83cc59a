"""moelab-routing: expert specialisation of a trained MoE run on held-out documents.

moelab-routing runs/moelab/<run>                      # writes <run>/routing/
moelab-routing runs/moelab/<run> --out routing/ --split train --max-tokens 2048

Writes routing.json (top 20 tokens per expert per layer, expert share per document, the rate
at which consecutive tokens keep their expert), routing.html (an embeddable fragment) and PNGs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moelab-routing", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a moelab MoE run directory with checkpoints/")
    parser.add_argument("--out", type=Path, default=None, help="output folder (<run>/routing)")
    parser.add_argument("--split", default="validation", help="documents: validation or train")
    parser.add_argument("--max-tokens", type=int, default=4096, help="tokens read per document")
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: the newest)")
    args = parser.parse_args(argv)
    from moelab.analysis.routing import analyze, write_outputs

    try:
        stats = analyze(args.run_dir, args.split, args.max_tokens, args.tag)
    except ValueError as err:
        print(f"moelab-routing: {err}", file=sys.stderr)
        return 2
    out = write_outputs(stats, args.out or args.run_dir / "routing")
    for lr in stats.layers:
        print(
            f"layer {lr.layer}: consecutive tokens keep their expert {lr.keep_rate:.1%} "
            f"(chance {lr.chance_keep_rate:.1%}); routes per expert {lr.routes_per_expert}"
        )
    print(f"moelab-routing: wrote {out}/routing.json, routing.html, doc_share.png, keep_rate.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
