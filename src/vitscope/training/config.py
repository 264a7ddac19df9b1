"""The run configuration: dataclass defaults < YAML recipe < ``key=value`` overrides, type-checked.

Follows DeiT / timm ``train.py``: one flat set of hyper-parameters, a recipe file per paper, and the
resolved configuration written next to the outputs (``config.yaml``) and inside every checkpoint.
Recipes ship in ``vitscope/recipes/*.yaml``; a path to any YAML file works the same way.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from vitscope.io.atomic import atomic_write_text

__all__ = [
    "TrainConfig", "ConfigError", "list_recipes", "load_recipe", "resolve_config", "parse_overrides",
    "config_to_dict", "config_from_dict", "save_config", "PROBE_KEYS",
]

PROBE_KEYS = ("every", "measures", "num_images")
CHOICES = {
    "amp": ("none", "bf16", "fp16"),
    "train_crop": ("rrc", "pad", "resize"),
    "clip_mode": ("norm", "value", "agc"),
    "device": ("auto", "cpu", "cuda"),
    "mixup_mode": ("batch", "pair", "elem"),
}


class ConfigError(ValueError):
    """A bad recipe name, key or value; the message lists the valid choices."""


@dataclass
class TrainConfig:
    """Every setting of a training run. Field comments give the DeiT / timm ``train.py`` equivalent."""

    # What to train on what.
    model: str = "test_vit_cifar"
    data: str = "fake"
    out: str = "runs/vitscope"  # run directory: config.yaml, metrics.jsonl, checkpoints
    recipe: str = ""  # name or path of the recipe the run was built from (informational)
    model_kwargs: dict = field(default_factory=dict)  # extra create_model kwargs (e.g. cb_placement)
    data_options: dict = field(default_factory=dict)  # extra create_loader spec options
    num_classes: int | None = None  # None: from data_info(data); written resolved into config.yaml
    img_size: int | None = None  # None: the model's default input size
    max_examples: int | None = None  # seeded random subset of the training set (None: all)
    data_fraction: float | None = None  # keep this fraction of every class (ConViT sample efficiency)
    max_val_examples: int | None = None
    num_workers: int = 0
    repeated_aug: int = 0  # > 1: DeiT's repeated augmentation, each image this many times (timm RepeatAugSampler)
    # Schedule.
    epochs: int = 10  # cosine epochs; the total adds warmup_epochs when warmup_prefix is true
    batch_size: int = 64  # GLOBAL batch (split evenly across distributed processes)
    eval_batch_size: int | None = None  # None: batch_size
    # Optimizer (timm.optim.create_optimizer_v2).
    opt: str = "adamw"
    lr: float = 1e-3
    lr_scale_batch: int | None = None  # DeiT: lr * batch_size / lr_scale_batch (512); None: lr as is
    weight_decay: float = 0.05
    momentum: float = 0.9
    opt_eps: float | None = None
    opt_betas: list | None = None
    sam_rho: float = 0.0  # > 0: sharpness-aware minimization (Foret et al. 2021) with this radius
    clip_grad: float | None = None
    clip_mode: str = "norm"
    # Learning-rate schedule (timm.scheduler.create_scheduler_v2).
    sched: str = "cosine"
    warmup_epochs: int = 0
    warmup_prefix: bool = False  # true: warm-up comes before the `epochs` cosine epochs
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    sched_on_updates: bool = False  # step the schedule every update instead of every epoch
    # Loss and augmentation.
    smoothing: float = 0.0  # label smoothing
    mixup: float = 0.0  # mixup alpha (0 = off)
    cutmix: float = 0.0  # cutmix alpha (0 = off)
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"
    augment: bool = True  # false: no training augmentation at all (eval transform)
    train_crop: str = "rrc"  # rrc: RandomResizedCrop (DeiT); pad: random crop after padding (CIFAR)
    crop_padding: int = 4
    scale: list = field(default_factory=lambda: [0.08, 1.0])  # rrc scale range
    hflip: float = 0.5
    color_jitter: float = 0.0
    auto_augment: str | None = None  # timm policy string, e.g. rand-m9-mstd0.5-inc1
    reprob: float = 0.0  # random erasing probability
    remode: str = "pixel"
    recount: int = 1
    interpolation: str = "bicubic"
    drop_path: float = 0.0
    drop: float = 0.0
    # Exponential moving average of the weights (timm.utils.ModelEmaV3).
    model_ema: bool = False
    model_ema_decay: float = 0.9998
    # Runtime.
    seed: int = 0
    device: str = "auto"
    amp: str = "none"  # none | bf16 | fp16 (CUDA only; ignored on CPU)
    channels_last: bool = False  # CUDA only
    compile: bool = False  # torch.compile the training model
    deterministic: bool = False  # torch.use_deterministic_algorithms(True) for the run
    progress: bool = True  # tqdm bars (on a terminal, rank 0)
    tensorboard: bool = False  # also log to TensorBoard when it is installed
    probes: dict = field(default_factory=dict)  # {every: 1, measures: [...], num_images: 32}
    # Early stopping on the validation loss (val_nll); None: train every epoch.
    early_stop_patience: int | None = None  # stop after this many epochs without an improvement
    early_stop_min_delta: float = 0.0  # an improvement lowers the best val_nll by more than this
    pretrained: bool = False  # start from timm's hub weights (fine-tuning); the head is re-initialised


FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(TrainConfig)}
_HINTS = typing.get_type_hints(TrainConfig)


def _recipe_dir() -> Path:
    return Path(str(resources.files("vitscope") / "recipes"))


def list_recipes() -> list[str]:
    """Names of the recipes shipped with vitscope (``vitscope/recipes/*.yaml``)."""
    return sorted(p.stem for p in _recipe_dir().glob("*.yaml"))


def _unknown(kind: str, name: str, valid: list[str] | tuple[str, ...]) -> ConfigError:
    close = difflib.get_close_matches(name, valid, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return ConfigError(f"Unknown {kind} {name!r}.{hint} Valid choices: {', '.join(valid)}")


def load_recipe(name_or_path: str) -> dict[str, Any]:
    """The raw mapping of a shipped recipe (by name) or of a YAML file (by path), keys validated."""
    path = Path(name_or_path)
    if not (path.suffix in (".yaml", ".yml") or os.sep in name_or_path):
        if name_or_path not in list_recipes():
            raise _unknown("recipe", name_or_path, list_recipes())
        path = _recipe_dir() / f"{name_or_path}.yaml"
    if not path.is_file():
        raise FileNotFoundError(
            f"Recipe file {str(path)!r} does not exist; give an existing YAML file or one of the "
            f"shipped recipes: {', '.join(list_recipes())}"
        )
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"Recipe {str(path)!r} must be a YAML mapping of config keys, got {type(data).__name__}")
    for key in data:
        _check_key(key)
    return data


def read_yaml(path: str | os.PathLike) -> Any:
    """``yaml.safe_load`` of a file; a syntax error becomes a ConfigError naming the file."""
    try:
        with open(path) as f:
            return yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{str(path)!r} is not valid YAML ({e}); fix the file") from None


def _check_key(key: str) -> None:
    if key not in FIELDS:
        raise _unknown("config key", key, sorted(FIELDS))


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check (and where unambiguous convert) ``value`` to the field type ``tp``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "~")):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"Config key {key!r} cannot be {value!r}")
    bad = ConfigError(
        f"Config key {key!r} expects {_type_name(tp)}, got {value!r} ({type(value).__name__})"
    )
    if tp is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            value = value.lower() in ("true", "yes", "1")
        if isinstance(value, bool):
            return value
    elif tp in (int, float) and not isinstance(value, bool):
        if isinstance(value, str):  # PyYAML reads `1e-3` (no dot) as a string
            try:
                value = tp(value)
            except ValueError:
                raise bad from None
        if tp is int and isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, (int, float)) and (tp is float or isinstance(value, int)):
            return tp(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif (origin or tp) in (list, dict):
        container = origin or tp
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                raise bad from None
        if isinstance(value, tuple) and container is list:
            value = list(value)
        if isinstance(value, container):
            return container(value)
    raise bad


def parse_overrides(items: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``["lr=1e-3", "probes.every=2"]`` -> ``{"lr": "1e-3", "probes.every": 2}`` (YAML-parsed values)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"Override {item!r} must look like key=value (e.g. lr=1e-3 or epochs=5)")
        _check_key(key.split(".")[0])
        try:
            out[key] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            out[key] = raw
    return out


def _validate(cfg: TrainConfig) -> None:
    for key, choices in CHOICES.items():
        if getattr(cfg, key) not in choices:
            raise ConfigError(f"Config key {key!r} is {getattr(cfg, key)!r}; valid choices: {', '.join(choices)}")
    for key in ("epochs", "batch_size"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"Config key {key!r} must be >= 1, got {getattr(cfg, key)}")
    if cfg.lr <= 0:
        raise ConfigError(f"Config key 'lr' must be > 0, got {cfg.lr}")
    if cfg.repeated_aug < 0:
        raise ConfigError(f"Config key 'repeated_aug' must be >= 0 (0 or 1 disables it; DeiT uses 3), "
                          f"got {cfg.repeated_aug}")
    if cfg.sam_rho < 0:
        raise ConfigError(f"Config key 'sam_rho' must be >= 0 (0 disables SAM), got {cfg.sam_rho}")
    if len(cfg.scale) != 2:
        raise ConfigError(f"Config key 'scale' must be [min, max], got {cfg.scale}")
    for key in cfg.probes:
        if key not in PROBE_KEYS:
            raise _unknown("probes key", key, PROBE_KEYS)
    if cfg.probes:
        from vitscope.training.probes import list_probes

        measures = cfg.probes.get("measures", [])
        if isinstance(measures, str):
            measures = [measures]
        for m in measures:
            if m not in list_probes():
                raise _unknown("probe measure", m, list_probes())
        cfg.probes = {"every": int(cfg.probes.get("every", 1)), "measures": list(measures),
                      "num_images": int(cfg.probes.get("num_images", 32))}
        if cfg.probes["every"] < 1:
            raise ConfigError("probes.every must be >= 1 (epochs between probe measurements)")


def resolve_config(
    recipe: str | None = None,
    overrides: dict[str, Any] | list[str] | None = None,
    base: TrainConfig | None = None,
    **kwargs: Any,
) -> TrainConfig:
    """Build the run config: dataclass defaults (or ``base``), then ``recipe``, then ``overrides``, then ``kwargs``.

    ``overrides`` is a mapping or a list of ``key=value`` strings; dotted keys set one entry of a
    dict field (``probes.every=2``). ``None`` kwargs are ignored (argparse defaults never override).
    """
    values: dict[str, Any] = config_to_dict(base) if base is not None else {}
    if recipe:
        values.update(load_recipe(recipe))
        values["recipe"] = recipe
    if isinstance(overrides, (list, tuple)):
        overrides = parse_overrides(overrides)
    merged = dict(overrides or {})
    merged.update({k: v for k, v in kwargs.items() if v is not None})
    for key, value in merged.items():
        top, _, sub = key.partition(".")
        _check_key(top)
        if sub:
            if _HINTS[top] is not dict:
                raise ConfigError(f"Config key {top!r} is not a mapping; use {top}=VALUE, not {key}=VALUE")
            inner = dict(values.get(top) or FIELDS[top].default_factory())  # type: ignore[misc]
            inner[sub] = value
            values[top] = inner
        else:
            values[key] = value
    return config_from_dict(values)


def config_from_dict(values: dict[str, Any]) -> TrainConfig:
    """A type-checked ``TrainConfig`` from a mapping (e.g. a run's ``config.yaml``)."""
    kwargs = {}
    for key, value in values.items():
        _check_key(key)
        kwargs[key] = _coerce(key, value, _HINTS[key])
    cfg = TrainConfig(**kwargs)
    _validate(cfg)
    return cfg


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: TrainConfig, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML, atomically."""
    atomic_write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
