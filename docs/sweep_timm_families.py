"""Sweep: vitscope.capture, probe and attention_maps on the smallest model of every timm model module.

Random weights, batch 4, 128 px where the model runs at that size (``img_size=128`` for
the transformers that take it), else its default input size. Per module it checks:
the capture leaves the output unchanged;
``layers="blocks"`` records the stem then every block in the order the blocks run; every attention map equals
timm's own ``AttentionExtract`` (hooks on ``*attn_drop`` with fused attention off); ``vitscope.probe`` with the
default measures and ``vitscope.attention_maps`` run. Writes one JSON line per module to stdout.

    PYTHONPATH=src python docs/sweep_timm_families.py --smallest docs/timm_smallest_models.json > sweep.jsonl
    python docs/sweep_timm_families.py --table sweep.jsonl   # the table of docs/models.md
"""
from __future__ import annotations

import json
import signal
import sys
import time
import warnings

import timm
import torch
from timm.utils import AttentionExtract

import vitscope
from vitscope.capture.geometry import WINDOW_GROUPS
from vitscope.capture.sites import find_blocks


def smallest(module: str) -> tuple[str, int]:
    best = None
    for name in timm.list_models(module=module):
        try:
            with torch.device("meta"):
                n = sum(p.numel() for p in timm.create_model(name).parameters())
        except Exception:  # noqa: BLE001 - some registered names need extra arguments
            continue
        if best is None or n < best[1]:
            best = (name, n)
    return best


def build(name: str, side: int = 128) -> tuple[torch.nn.Module, tuple[int, int]]:
    """The model at ``side`` px where it takes that size (``img_size=``, or any size for a CNN), else at its
    default input size."""
    cfg = timm.get_pretrained_cfg(name)
    default = tuple(cfg.input_size[-2:]) if cfg is not None else (224, 224)
    for kwargs, size in (({"img_size": side}, (side, side)), ({}, (side, side)), ({}, default)):
        try:
            model = timm.create_model(name, **kwargs).eval()
            with torch.no_grad():
                model(torch.randn(1, 3, *size))
            return model, size
        except Exception:  # noqa: BLE001 - try the next size
            continue
    raise ValueError(f"{name} runs at none of {side} px, its default {default}")


def check(module: str, name: str, n_params: int) -> dict:
    row: dict = {"module": module, "model": name, "params": n_params}
    torch.manual_seed(0)
    model, size = build(name)
    x = torch.randn(4, 3, *size)  # CKA needs n > 3
    row["input"] = list(x.shape)
    sites = find_blocks(model)
    row["blocks"] = len(sites)
    row["families"] = sorted({s.family for s in sites})
    with torch.no_grad():
        ref = model(x)
        fired: list[str] = []
        handles = [s.module.register_forward_hook(lambda m, i, o, n=s.name: fired.append(n)) for s in sites]
        try:
            with vitscope.capture(model, attention=False, layers="blocks") as cap:
                out = model(x)
        finally:
            for h in handles:
                h.remove()
        row["capture"] = bool(torch.allclose(out, ref, atol=1e-5, rtol=1e-5)) and len(cap.records) > 1
        names = [r.info.name for r in cap.records]
        row["block_records"] = len(names) - 1
        row["forward_order"] = names[1:] == list(dict.fromkeys(fired)) and names[0] == "stem"
        with vitscope.capture(model, attention=True) as cap:
            model(x)
        row["sublayer_records"] = len(cap.records)
        row["residual_records"] = len(cap.residual_records)
        kinds: dict[str, int] = {}
        for info in cap.attention_layout:
            kinds[info.kind] = kinds.get(info.kind, 0) + 1
        row["attention_kinds"] = kinds
        try:
            with vitscope.explicit_attention(model):
                timm_maps = AttentionExtract(model, method="hook")(x)
        except RuntimeError:
            timm_maps = {}
        mine = {i.name + ".attn_drop": a for i, a in zip(cap.attention_layout, cap.attentions)}
        row["timm_attention_maps"] = len(timm_maps)
        timm_maps = {k: v.flatten(0, 1) if isinstance(model.get_submodule(k.rpartition(".")[0]), WINDOW_GROUPS)
                     else v for k, v in timm_maps.items()}  # capture records Twins' per-image windows flattened
        row["attention_equal"] = len(timm_maps) == len(mine) and all(
            k in mine and mine[k].shape == v.shape and torch.allclose(mine[k], v, atol=1e-6)
            for k, v in timm_maps.items())
    t = time.perf_counter()
    res = vitscope.probe(model, [(x, torch.zeros(x.shape[0], dtype=torch.long))], progress=False,
                         measures=[m for m in ("attention_entropy", "attention_distance", "cka", "ratio_of_norms",
                                               "fourier", "feature_variance")
                                   if kinds or m not in ("attention_entropy", "attention_distance")])
    row["probe"] = True
    row["probe_s"] = round(time.perf_counter() - t, 2)
    row["not_applicable"] = sorted({k for v in res.meta.get("not_applicable", {}).values() for k in v})[:3]
    if any(i.has_positions for i in cap.attention_layout):
        maps = vitscope.attention_maps(model, x[:1], embeddings=False)
        row["attention_maps"] = len(maps.layers)
    return row


def table(rows: list[dict]) -> str:
    """The markdown table of docs/models.md from the sweep's JSON lines."""
    out = ["| module | smallest model | px | blocks (families) | split sub-layers | attention kinds (maps = timm's) "
           "| probe / query maps |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['module']} | {r['model']} | | | | | {r['error']} |")
            continue
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(r["attention_kinds"].items())) or "none"
        same = "=" if r["attention_equal"] else "!="
        probe = "probe ok" + (f", maps {r['attention_maps']}" if "attention_maps" in r else "")
        out.append(f"| {r['module']} | {r['model']} | {r['input'][-1]} | {r['blocks']} ({'+'.join(r['families'])}) "
                   f"| {r['residual_records']} | {kinds} ({r['timm_attention_maps']} {same} timm) | {probe} |")
    return "\n".join(out)


class _Timeout(Exception):
    pass


def main() -> None:
    """``python docs/sweep_timm_families.py [--smallest docs/timm_smallest_models.json] [MODULE ...]``:
    FILE caches the smallest model
    of each module (``{module: [name, params]}``; found by instantiating every model on the meta device, ~6 min).
    ``python docs/sweep_timm_families.py --table sweep.jsonl`` prints the table of docs/models.md."""
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    args = sys.argv[1:]
    if args[:1] == ["--table"]:
        with open(args[1]) as f:
            print(table([json.loads(line) for line in f if line.strip()]))
        return
    cache = {}
    if args[:1] == ["--smallest"]:
        with open(args[1]) as f:
            cache = json.load(f)
        args = args[2:]
    for module in timm.list_modules():
        if (args and module not in args) or not hasattr(timm.models, module):
            continue  # a module vitscope registers itself (its own models are tested apart)
        name, n = cache.get(module) or smallest(module)
        signal.signal(signal.SIGALRM, lambda *_: (_ for _ in ()).throw(_Timeout()))
        signal.alarm(240)
        t = time.perf_counter()
        row = {}
        try:
            row = check(module, name, n)
        except _Timeout:
            row = {"module": module, "model": name, "error": "timeout 240 s"}
        except Exception as e:  # noqa: BLE001 - the sweep reports every failure and goes on
            row = {"module": module, "model": name,
                   "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
        finally:
            signal.alarm(0)
        row["seconds"] = round(time.perf_counter() - t, 1)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
