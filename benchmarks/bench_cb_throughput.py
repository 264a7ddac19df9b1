"""Training throughput of Context Broadcasting (Hyeon-Woo et al. 2023) against the plain ViT of the same size.

The paper claims CB costs "negligible" extra compute (a token mean per block, no parameters). This
script times full training steps (forward, cross-entropy, backward, AdamW step) through vitscope's own
``train_one_epoch`` for each model, side by side in one process, with interleaved repeats (the order
alternates every repeat) so drift in machine load hits both models alike. It prints images/s per model
and the CB / plain ratio (median of the per-repeat ratios); the goal is a cost of at most 3%.

    python benchmarks/bench_cb_throughput.py                      # CIFAR size: vit_tiny(_cb)_patch4_32
    python benchmarks/bench_cb_throughput.py --pair 224 --device cuda --amp bf16 --batch-size 256
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn as nn

import vitscope
from vitscope.training import train_one_epoch

PAIRS = {
    "32": ("vit_tiny_patch4_32", "vit_tiny_cb_patch4_32", 32),  # vitscope's CIFAR ViT-Ti, 8x8 tokens
    "224": ("vit_tiny_patch16_224", "vit_tiny_cb_patch16_224", 224),  # timm's ViT-Ti vs vitscope's CB
}


def make_step(name: str, img: int, batch: int, steps: int, device: torch.device, amp: str, channels_last: bool):
    torch.manual_seed(0)
    model = vitscope.create_model(name, num_classes=100).to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(batch, 3, img, img, generator=gen).to(device),
                torch.randint(0, 100, (batch,), generator=gen).to(device)) for _ in range(steps)]
    amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    scaler = torch.amp.GradScaler("cuda") if amp == "fp16" else None
    crit = nn.CrossEntropyLoss()

    def run() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        train_one_epoch(model, batches, opt, crit, 0, device=device, amp_dtype=amp_dtype, scaler=scaler,
                        channels_last=channels_last)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return batch * steps / (time.perf_counter() - start)

    n_params = sum(p.numel() for p in model.parameters())
    return run, n_params


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pair", choices=sorted(PAIRS), default="32")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=10, help="training steps per timed repeat")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=1, help="untimed repeats per model first")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    plain_name, cb_name, img = PAIRS[args.pair]
    runs = {}
    for name in (plain_name, cb_name):
        runs[name], n_params = make_step(name, img, args.batch_size, args.steps, device, args.amp, args.channels_last)
        print(f"{name}: {n_params:,} parameters")
    for _ in range(args.warmup):
        for run in runs.values():
            run()
    rates: dict[str, list[float]] = {name: [] for name in runs}
    ratios = []
    for r in range(args.repeats):
        order = [plain_name, cb_name] if r % 2 == 0 else [cb_name, plain_name]
        got = {name: runs[name]() for name in order}
        for name, v in got.items():
            rates[name].append(v)
        ratios.append(got[cb_name] / got[plain_name])
    print(f"\ndevice {device} ({torch.get_num_threads()} threads), img {img}, batch {args.batch_size}, "
          f"{args.steps} steps x {args.repeats} interleaved repeats, amp {args.amp}")
    print(f"{'model':<26} {'median img/s':>12} {'min':>9} {'max':>9}")
    for name, v in rates.items():
        print(f"{name:<26} {statistics.median(v):12.1f} {min(v):9.1f} {max(v):9.1f}")
    med = statistics.median(ratios)
    print(f"CB / plain throughput: median {med:.4f} (per repeat {min(ratios):.4f} .. {max(ratios):.4f}); "
          f"CB cost {100 * (1 - med):+.2f}% (goal <= 3%)")


if __name__ == "__main__":
    main()
