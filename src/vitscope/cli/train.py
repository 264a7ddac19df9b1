"""``vitscope train``: train a model with a recipe, or resume a run.

    vitscope train --config cpu-quick --model test_vit_cifar --data fake --out runs/demo epochs=3
    vitscope train --resume runs/demo        # after a kill at any moment (or a requeue by a scheduler)
    vitscope train --config deit --model vit_tiny_patch16_224 --pretrained --data imagefolder:PATH --out runs/ft
    torchrun --nproc_per_node 2 -m vitscope train --config hdvw-cifar --model vit_tiny_patch4_32 \\
        --data cifar100:~/data/cifar --out runs/vit-cifar100
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Any


def add_parser(sub: argparse._SubParsersAction) -> None:
    from vitscope.training import list_recipes

    p = sub.add_parser(
        "train", help="train a model with a recipe (or resume a run)",
        description="Train MODEL on DATA with a recipe; settings: recipe < key=value overrides. Writes "
        "config.yaml, metrics.jsonl, probes.jsonl and the latest complete checkpoint (checkpoints/epoch-N/, "
        "its weights also as model.safetensors) into --out, which is locked while the run trains.",
    )
    p.add_argument("--config", metavar="RECIPE_OR_FILE",
                   help=f"a shipped recipe ({', '.join(list_recipes())}) or a YAML file of config keys")
    p.add_argument("--model", help="model name (`vitscope models` lists vitscope's; any timm name works)")
    p.add_argument("--data", help="data spec, e.g. fake, elpv, cifar10:PATH, imagefolder:PATH")
    p.add_argument("--out", metavar="RUN_DIR", help="run directory (created)")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue the run in RUN_DIR from its last complete checkpoint (a run killed before its "
                   "first checkpoint starts again from its saved config)")
    p.add_argument("--resume-epoch", type=int, metavar="N",
                   help="with --resume: continue from the kept checkpoint of epoch N (the run keeps its last two; "
                   "use the previous one when the newest is damaged); newer checkpoints are removed")
    p.add_argument("--auto-resume", action="store_true",
                   help="with --out: continue the run there if it has started (its settings must be the same), "
                   "else start it; for job schedulers that requeue the same command line")
    p.add_argument("--pretrained", action="store_true",
                   help="fine-tune: start from timm's hub weights of --model (config key pretrained=true)")
    t = p.add_argument_group("timm train.py's spellings of config keys (the same key as key=value is an error)")
    t.add_argument("-b", "--batch-size", type=int, help="global batch: batch_size=N")
    t.add_argument("-j", "--workers", type=int,
                   help="data loader workers: num_workers=N (default: 4 as timm's train.py, at most the CPUs "
                   "available, unless the recipe or config file sets num_workers; results do not depend on it)")
    t.add_argument("--img-size", type=int, help="img_size=S")
    t.add_argument("--input-size", type=int, nargs=3, metavar=("C", "H", "W"), help="3 S S: img_size=S")
    t.add_argument("--amp", action="store_true", help="mixed precision in --amp-dtype (CUDA): amp=fp16 or bf16")
    t.add_argument("--amp-dtype", choices=("float16", "bfloat16"), default="float16",
                   help="with --amp (default float16, as timm)")
    t.add_argument("--device", help="auto (the config's default: cuda if available), cpu, cuda: device=NAME")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. lr=1e-3 epochs=5")
    p.set_defaults(func=run)


def _flag_overrides(args: argparse.Namespace) -> list[str]:
    """``key=value`` for timm's flags; a key given both ways is a CLIError."""
    from vitscope.cli import CLIError
    from vitscope.runtime import amp_name

    keys: dict[str, str] = {}
    if args.batch_size is not None:
        keys["batch_size"] = str(args.batch_size)
    if args.workers is not None:
        keys["num_workers"] = str(args.workers)
    size = args.img_size
    if args.input_size is not None:
        c, h, w = args.input_size
        if c != 3 or h != w or (size is not None and size != h):
            raise CLIError(f"--input-size {c} {h} {w}: vitscope trains on square RGB inputs, 3 S S (S = --img-size)")
        size = h
    if size is not None:
        keys["img_size"] = str(size)
    if args.amp:
        keys["amp"] = amp_name(args.amp_dtype)
    if args.device is not None:
        keys["device"] = args.device
    given = {o.split("=", 1)[0].strip() for o in args.overrides if "=" in o}
    both = sorted(given & set(keys))
    if both:
        raise CLIError(f"{', '.join(both)} given both as a flag and as key=value; pass it once")
    return [f"{k}={v}" for k, v in keys.items()]


def run(args: argparse.Namespace) -> int:
    from vitscope.cli import CLIError
    from vitscope.cli._common import WORKERS
    from vitscope.training import NonFiniteLossError, TrainConfig, load_config, resolve_config, train

    args.overrides = list(args.overrides) + _flag_overrides(args)
    resume = bool(args.resume)
    if args.resume_epoch is not None and (not args.resume or args.resume_epoch < 0):
        raise CLIError("--resume-epoch N goes with --resume RUN_DIR and names a kept checkpoint (N >= 0)")
    if args.resume and args.auto_resume:
        raise CLIError("--auto-resume goes with --out RUN_DIR and the run's settings; drop --resume")
    if args.resume:
        if args.config:
            raise CLIError("--resume continues with the run's saved config.yaml; drop --config "
                           "(change single settings with key=value)")
        if args.pretrained:
            raise CLIError("--pretrained applies when a run starts; --resume continues from the run's checkpoint")
        if args.out and args.out != args.resume:
            raise CLIError(f"--resume {args.resume} writes into that run directory; drop --out {args.out}")
        base = load_config(args.resume)
        cfg = resolve_config(overrides=args.overrides, base=base, model=args.model, data=args.data,
                             out=args.resume)
        if (cfg.model, cfg.data) != (base.model, base.data):
            raise CLIError(f"--resume {args.resume}: the run trained {base.model} on {base.data}; "
                           "--model and --data cannot change on resume")
    else:
        if not args.out:
            raise CLIError("--out RUN_DIR is required (the run directory to create), or --resume RUN_DIR")
        cfg = resolve_config(args.config, args.overrides, base=TrainConfig(num_workers=WORKERS), model=args.model,
                             data=args.data, out=args.out, pretrained=True if args.pretrained else None)
        if args.auto_resume and os.path.isfile(os.path.join(args.out, "config.yaml")):
            cfg, resume = _same_run(load_config(args.out), cfg, args.out), True
    try:
        result = train(cfg, resume=resume, resume_epoch=args.resume_epoch)
    except NonFiniteLossError as e:
        raise CLIError(str(e)) from None
    if int(os.environ.get("RANK", 0)) == 0:  # under torchrun, one summary line
        print(json.dumps(result))
    return 0


_RUNTIME_KEYS = ("out", "progress", "device", "tensorboard", "num_workers")  # may differ between attempts


def _same_run(saved: Any, cfg: Any, out: str) -> Any:
    """``saved`` (the run's resolved config) when ``cfg`` asks for the same run, else a CLIError naming the
    settings that differ; ``num_classes`` / ``img_size`` left unset and ``preprocess=auto`` in ``cfg`` take the
    saved values."""
    import dataclasses

    from vitscope.cli import CLIError
    from vitscope.training.config import config_to_dict

    old, new = config_to_dict(saved), config_to_dict(cfg)
    differ = sorted(k for k in new if k not in _RUNTIME_KEYS and new[k] != old.get(k)
                    and not (k in ("num_classes", "img_size") and new[k] is None)
                    and not (k == "preprocess" and new[k] == "auto"))  # the saved one is auto resolved
    if differ:
        shown = ", ".join(f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in differ)
        raise CLIError(f"--auto-resume: {out} holds a run with other settings ({shown}); use the command that "
                       "started it, or train into another --out")
    return dataclasses.replace(saved, **{k: new[k] for k in _RUNTIME_KEYS})
