"""Time the jitted JAX training step against the PyTorch one, as chapter 7 does, and print the ratio.

Same model, weights and batch in both frameworks; both warmed up; rounds alternate between
them so a busy machine slows both alike. The ratio is PyTorch time / JAX time per step
(above 1: JAX is faster), the median over rounds. Chapter 7 imports
:func:`benchmark_train_steps` from here.

    python benchmarks/jax_vs_torch.py                      # chapter 5's quick ViT, batch 128
    python benchmarks/jax_vs_torch.py --preset vit-tiny --batch-size 32
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from vitcourse.train import CONFIGS
from vitcourse.vit import PRESETS, VisionTransformer, ViTConfig

__all__ = ["benchmark_train_steps", "main"]


def benchmark_train_steps(
    config: ViTConfig, batch_size: int = 128, rounds: int = 7, steps: int = 3, seed: int = 0
) -> dict:
    """Time the jitted JAX train step against the PyTorch train step on the same model, weights and batch.

    Both steps do the same work: forward, cross-entropy (label smoothing 0.1),
    backward, gradient clipping at norm 1, an AdamW update. Both are warmed up
    first (JAX's first call compiles), then ``rounds`` rounds alternate between
    the frameworks, ``steps`` steps each, so slow phases of a shared machine hit both.

    Returns:
        ``{"torch": [...], "jax": [...]}`` seconds per step in each round, ``"ratios"``
        (torch time / JAX time per round), ``"median_ratio"`` (above 1: JAX is faster),
        ``"compile_seconds"``, the time of JAX's first (compiling) call, and the
        threads each framework may use (``"torch_threads"``; XLA's CPU backend uses
        every core, ``"cpu_count"``), so a reader can see that the comparison is even.

    Raises:
        ImportError: if JAX is not installed (JAX is imported when this runs, not when the module is).
    """
    import jax
    import jax.numpy as jnp

    from vitcourse.jax_vit import adamw, from_torch, make_train_step

    torch.manual_seed(seed)
    model = VisionTransformer(config).train()
    torch_opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, config.in_channels, config.image_size, config.image_size, generator=g)
    labels = torch.randint(0, config.num_classes, (batch_size,), generator=g)

    def torch_step() -> None:
        torch_opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), labels, label_smoothing=0.1).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        torch_opt.step()

    optimizer = adamw(1e-4)
    params = from_torch(model)
    state = {"params": params, "opt": optimizer.init(params)}
    jax_step_fn = make_train_step(config, optimizer, label_smoothing=0.1, clip_norm=1.0)
    x, y = jnp.asarray(images.numpy()), jnp.asarray(labels.numpy())
    key = jax.random.key(seed) if config.dropout or config.drop_path else None

    def jax_step() -> jax.Array:
        state["params"], state["opt"], loss = jax_step_fn(state["params"], state["opt"], x, y, key)
        return loss

    tick = time.perf_counter()
    jax_step().block_until_ready()  # trace + compile + run once
    compile_seconds = time.perf_counter() - tick
    torch_step()  # warm-up: allocator, thread pool

    def timed(run: Callable[[], object]) -> float:
        tick = time.perf_counter()
        for _ in range(steps):
            out = run()
        if out is not None:
            out.block_until_ready()  # JAX dispatches asynchronously: wait for the result
        return (time.perf_counter() - tick) / steps

    times = {"torch": [], "jax": []}
    for _ in range(rounds):
        times["torch"].append(timed(torch_step))
        times["jax"].append(timed(jax_step))
    ratios = [t / j for t, j in zip(times["torch"], times["jax"])]
    return {**times, "ratios": ratios, "median_ratio": float(np.median(ratios)), "compile_seconds": compile_seconds,
            "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark from the command line: exit status 0, 2 for a bad argument, 1 without JAX."""
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
        import vitcourse.jax_vit  # noqa: F401 - only to say up front when JAX is missing
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
