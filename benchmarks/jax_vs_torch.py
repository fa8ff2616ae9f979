"""Time the jitted JAX training step against the PyTorch one, as chapter 7 does, and print the ratio.

Same model, weights and batch in both frameworks; both warmed up; rounds alternate between
them so a busy machine slows both alike. The ratio is PyTorch time / JAX time per step
(above 1: JAX is faster), the median over rounds.

    python benchmarks/jax_vs_torch.py                      # chapter 5's quick ViT, batch 128
    python benchmarks/jax_vs_torch.py --preset vit-tiny --batch-size 32 --image-size 224
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from vitcourse.train import CONFIGS
from vitcourse.vit import PRESETS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="quick", help=f"quick (default) or one of {', '.join(PRESETS)}")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=7, help="alternating rounds (default 7)")
    parser.add_argument("--steps", type=int, default=3, help="steps per framework per round (default 3)")
    args = parser.parse_args(argv)
    if args.preset != "quick" and args.preset not in PRESETS:
        print(f"error: unknown preset {args.preset!r}; choose quick or one of {', '.join(PRESETS)}.", file=sys.stderr)
        return 2
    if min(args.batch_size, args.rounds, args.steps) < 1:
        print("error: --batch-size, --rounds and --steps must be positive integers.", file=sys.stderr)
        return 2
    try:
        from vitcourse.jax_vit import benchmark_train_steps
    except ImportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    config = CONFIGS["quick"].vit if args.preset == "quick" else dataclasses.replace(PRESETS[args.preset], dropout=0.0)
    result = benchmark_train_steps(config, batch_size=args.batch_size, rounds=args.rounds, steps=args.steps)
    print(f"model: {config}")
    print(f"JAX first call (trace + compile): {result['compile_seconds']:.1f} s")
    for i, (t, j) in enumerate(zip(result["torch"], result["jax"]), 1):
        print(f"round {i}: PyTorch {t * 1000:7.1f} ms/step   JAX {j * 1000:7.1f} ms/step   ratio {t / j:.2f}")
    print(f"median PyTorch/JAX time ratio: {result['median_ratio']:.2f} (above 1: JAX is faster)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
