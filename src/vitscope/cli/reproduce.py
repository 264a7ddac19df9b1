"""``vitscope reproduce STUDY``: train and probe what a study needs, then print its verdict table."""
from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any) -> None:
    from vitscope.studies import SCALES, list_studies

    p = sub.add_parser(
        "reproduce", help="reproduce a group of the papers' findings and print a verdict table",
        description="Train and probe what a study recipe needs over several seeds and end with a verdict table "
                    "(the paper's claim, the measured values, the paired difference with its 95% interval and p, "
                    "and the Holm-corrected verdict held / did not hold / inconclusive), "
                    "saved as verdicts.json, .csv and .md under OUT/STUDY/. Under torchrun "
                    "(torchrun --nproc_per_node N -m vitscope reproduce STUDY ...) every process trains each run "
                    "with DDP (--batch-size must be a multiple of N), the analyses are split over the processes "
                    "(each example counted once) and rank 0 alone writes. Studies: " + ", ".join(list_studies()),
    )
    p.add_argument("study", help="study name (" + ", ".join(list_studies()) + ") or a study YAML file")
    p.add_argument("--data", default=None, help="data spec (quick: elpv by default; paper: e.g. cifar100:PATH)")
    p.add_argument("--scale", default="quick", choices=SCALES,
                   help="quick: small models on CPU; paper: the papers' models and recipes (GPU)")
    p.add_argument("--out", default="runs/reproduce", help="output root; training runs are shared under OUT/runs")
    p.add_argument("--seeds", type=int, default=None,
                   help="number of seeds (default from the study: 4 at quick scale, chosen by power within a "
                        "60-minute budget; see docs/studies.md)")
    p.add_argument("--epochs", type=int, default=None, help="override the epochs (for smoke tests)")
    p.add_argument("--max-examples", type=int, default=None, help="train on a random subset (for smoke tests)")
    p.add_argument("--batch-size", type=int, default=None, help="override the training batch size")
    p.add_argument("--zoo", default=None, choices=("quick", "paper", "test"), help="override the model sizes")
    p.add_argument("--device", default="auto", help="auto (default: cuda if available, else cpu), cpu or cuda")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import sys

    from vitscope.cli._common import resolve_device
    from vitscope.distributed import init_from_env
    from vitscope.studies import run_study

    # torchrun: join the process group (train_spec trains with DDP in it, _analyze shards over it)
    info = init_from_env(resolve_device(args.device))
    res = run_study(args.study, data=args.data, scale=args.scale, out=args.out, seeds=args.seeds,
                    epochs=args.epochs, max_examples=args.max_examples, zoo=args.zoo, device=args.device,
                    batch_size=args.batch_size,
                    progress=sys.stderr.isatty())
    if not info.is_main:
        return 0  # rank 0 alone prints and writes
    print(res.markdown)
    print("files: " + ", ".join(str(p) for p in res.files.values()))
    return 0
