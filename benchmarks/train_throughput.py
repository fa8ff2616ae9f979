"""Training throughput of vitcourse's ViT against timm's ViT with the same configuration.

Both models get the same weights, batch, optimizer (AdamW) and loss. Their training
steps are timed alternately, in rounds, in this one process, so the machine's load
affects both alike; the script prints the median images per second of each and
their ratio (vitcourse / timm; the course's target is at least 1.0).

    python benchmarks/train_throughput.py                     # the quick config's ViT, batch 128
    python benchmarks/train_throughput.py --config cifar10 --rounds 20 --batch-size 256
    python benchmarks/train_throughput.py --config cifar10 --amp   # mixed precision, as training uses on a GPU

``--amp`` runs forward and loss under ``torch.autocast`` (bfloat16 where the GPU supports it,
else float16), on CUDA only; on a CPU it is ignored with a note, and the steps run in float32.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from vitcourse.timm_compat import to_timm
from vitcourse.train import CONFIGS
from vitcourse.vit import VisionTransformer


def step_time(model: torch.nn.Module, optimizer: torch.optim.Optimizer, images, labels, sync,
              amp_dtype: torch.dtype | None = None) -> float:
    """Seconds for one training step (forward, backward, AdamW update); autocast to ``amp_dtype`` on CUDA if given.

    ``images`` ``(B, C, S, S)``, ``labels`` ``(B,)``. No loss scaling: the step is timed, not trained.
    """
    sync()
    start = time.perf_counter()
    with torch.autocast("cuda", dtype=amp_dtype or torch.float16, enabled=amp_dtype is not None):
        loss = F.cross_entropy(model(images).float(), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    sync()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="quick", help=f"whose ViT to time: {', '.join(CONFIGS)}")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--rounds", type=int, default=10, help="timed rounds (each times both models)")
    p.add_argument("--steps", type=int, default=3, help="steps per model per round")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    p.add_argument("--amp", action="store_true", help="mixed precision (autocast), on CUDA only")
    args = p.parse_args(argv)
    if args.config not in CONFIGS or CONFIGS[args.config].model != "vit":
        print(f"error: {args.config!r} is not a ViT configuration; choose quick, cifar10 or seed-blog.", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    amp_dtype = None
    if args.amp and device.type == "cuda":
        amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    elif args.amp:
        print("note: --amp needs a CUDA GPU; timing in float32.", file=sys.stderr)

    torch.manual_seed(0)
    config = CONFIGS[args.config].vit
    ours = VisionTransformer(config).to(device).train()
    theirs = to_timm(ours).to(device).train()  # same weights
    models = {"vitcourse": ours, "timm": theirs}
    optimizers = {k: torch.optim.AdamW(m.parameters(), lr=1e-3) for k, m in models.items()}
    images = torch.randn(args.batch_size, config.in_channels, config.image_size, config.image_size, device=device)
    labels = torch.randint(0, config.num_classes, (args.batch_size,), device=device)

    for name in models:  # warm-up: allocator, kernels selection
        for _ in range(2):
            step_time(models[name], optimizers[name], images, labels, sync, amp_dtype)
    times: dict[str, list[float]] = {name: [] for name in models}
    for r in range(args.rounds):
        order = list(models) if r % 2 == 0 else list(reversed(models))  # alternate who goes first
        for name in order:
            for _ in range(args.steps):
                times[name].append(step_time(models[name], optimizers[name], images, labels, sync, amp_dtype))
    rate = {name: args.batch_size / statistics.median(t) for name, t in times.items()}
    print(f"config {args.config}: dim {config.dim}, depth {config.depth}, heads {config.heads}, "
          f"batch {args.batch_size}, device {device}, {torch.get_num_threads()} threads, "
          f"{str(amp_dtype or torch.float32).removeprefix('torch.')}")
    for name, value in rate.items():
        print(f"  {name:10s} {value:8.1f} images/s (median of {len(times[name])} steps)")
    print(f"throughput ratio vitcourse / timm = {rate['vitcourse'] / rate['timm']:.3f}  (target >= 1.0)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
