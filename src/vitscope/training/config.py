"""The run configuration: dataclass defaults < YAML recipe < ``key=value`` overrides, type-checked.

Follows DeiT / timm ``train.py``: one flat set of hyper-parameters, a recipe file per paper, and the
resolved configuration written next to the outputs (``config.yaml``) and inside every checkpoint.
Recipes ship in ``vitscope/recipes/*.yaml``; a path to any YAML file works the same way.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
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
    "preprocess": ("auto", "model", "data"),
}
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos", "box", "hamming")


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
    num_workers: int = 0  # loader processes (0: the main process); `vitscope train` defaults to min(4, CPUs) as timm
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
    # Early stopping on the validation loss (val_nll); None: train every epoch. An epoch without an improvement
    # counts against the patience only after the warm-up and once the learning rate has decayed to
    # early_stop_lr_fraction of its peak (early_stop.EarlyStop): a noisy plateau at a high learning rate is not
    # convergence (on ELPV, patience 3 counted from epoch 0 stopped small ViTs after 4-5 epochs, LR still at
    # 0.6-0.9 of its peak, attention entropy 0.9999 ln N). null counts every epoch (the rule before this key).
    early_stop_patience: int | None = None  # stop after this many counted epochs without an improvement
    early_stop_min_delta: float = 0.0  # an improvement lowers the best val_nll by more than this
    early_stop_lr_fraction: float | None = 0.5  # count stalls once lr <= this fraction of the peak; null: always
    early_stop_restore_best: bool = True  # end with the weights of the lowest val_nll (kept in best.safetensors)
    # Also keep the weights of every N-th epoch (epoch % N == 0) and of the last one as
    # checkpoints/kept/epoch-N.safetensors (a hard link, no extra space while the checkpoint exists), so that
    # `vitscope compare RUN@2 RUN@last` compares a run with itself over training; 0 keeps only the latest.
    keep_epochs: int = 0
    pretrained: bool = False  # start from timm's hub weights (fine-tuning); the head is re-initialised
    # Preprocessing (timm train.py: resolve_data_config). The input size is img_size; the training augmentation
    # keeps its own settings above and takes only mean/std from here.
    preprocess: str = "auto"  # model: the model's pretrained_cfg; data: the data set's; auto: model if pretrained
    mean: list | None = None  # normalization mean (train and val); None: from `preprocess`
    std: list | None = None  # normalization std (train and val); None: from `preprocess`
    crop_pct: float | None = None  # validation center-crop fraction; None: from `preprocess`
    eval_interpolation: str | None = None  # validation resize interpolation; None: from `preprocess`


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


# Numeric ranges: key -> (low, low inclusive, high, high inclusive, what it is / the usual value).
_RANGES: dict[str, tuple[float, bool, float, bool, str]] = {
    "epochs": (1, True, math.inf, False, "number of epochs"),
    "batch_size": (1, True, math.inf, False, "the global batch"),
    "eval_batch_size": (1, True, math.inf, False, "evaluation batch; null uses batch_size"),
    "lr": (0, False, math.inf, False, "learning rate, e.g. 1e-3"),
    "lr_scale_batch": (1, True, math.inf, False, "DeiT scales lr by batch_size / 512; null: no scaling"),
    "weight_decay": (0, True, math.inf, False, "e.g. 0.05; 0 disables it"),
    "momentum": (0, True, 1, False, "SGD momentum, e.g. 0.9"),
    "opt_eps": (0, False, math.inf, False, "e.g. 1e-8; null: the optimizer's default"),
    "sam_rho": (0, True, math.inf, False, "SAM radius, e.g. 0.05; 0 disables SAM"),
    "clip_grad": (0, False, math.inf, False, "e.g. 1.0; null disables clipping"),
    "warmup_epochs": (0, True, math.inf, False, "0 disables the warm-up"),
    "warmup_lr": (0, True, math.inf, False, "e.g. 1e-6"),
    "min_lr": (0, True, math.inf, False, "e.g. 1e-5"),
    "smoothing": (0, True, 1, False, "label smoothing, e.g. 0.1; 0 disables it"),
    "mixup": (0, True, math.inf, False, "mixup alpha, e.g. 0.8; 0 disables it"),
    "cutmix": (0, True, math.inf, False, "cutmix alpha, e.g. 1.0; 0 disables it"),
    "mixup_prob": (0, True, 1, True, "probability of mixing a batch"),
    "mixup_switch_prob": (0, True, 1, True, "probability of cutmix instead of mixup"),
    "crop_padding": (0, True, math.inf, False, "pixels of padding before the random crop, e.g. 4"),
    "hflip": (0, True, 1, True, "horizontal flip probability"),
    "color_jitter": (0, True, math.inf, False, "e.g. 0.4; 0 disables it"),
    "reprob": (0, True, 1, True, "random erasing probability, e.g. 0.25"),
    "recount": (1, True, math.inf, False, "random erasing count"),
    "drop_path": (0, True, 1, False, "stochastic depth rate, e.g. 0.1"),
    "drop": (0, True, 1, False, "dropout rate, e.g. 0.0"),
    "model_ema_decay": (0, False, 1, False, "e.g. 0.9998"),
    "num_workers": (0, True, math.inf, False, "loader processes; 0 loads in the main process"),
    "repeated_aug": (0, True, math.inf, False, "0 or 1 disables it; DeiT uses 3"),
    "max_examples": (1, True, math.inf, False, "null uses the whole training set"),
    "max_val_examples": (1, True, math.inf, False, "null uses the whole validation set"),
    "data_fraction": (0, False, 1, True, "fraction of every class kept, e.g. 0.1; null keeps all"),
    "num_classes": (1, True, math.inf, False, "null takes it from the data"),
    "img_size": (1, True, math.inf, False, "input size in pixels; null uses the model's"),
    "keep_epochs": (0, True, math.inf, False, "keep every N-th epoch's weights, e.g. 1; 0 keeps only the latest"),
    "early_stop_patience": (1, True, math.inf, False, "epochs without improvement; null disables early stopping"),
    "early_stop_min_delta": (0, True, math.inf, False, "smallest val_nll decrease that counts, e.g. 0.001"),
    "early_stop_lr_fraction": (0, False, 1, True, "stalls count once lr <= this fraction of its peak, e.g. 0.5; "
                                                   "1: from the end of the warm-up; null: from the first epoch"),
    "crop_pct": (0, False, 1, True, "validation center-crop fraction, e.g. 0.875; null: from `preprocess`"),
    "seed": (0, True, 2**32 - 1, True, "an integer seed, e.g. 0 (numpy takes 0 .. 2**32 - 1)"),
}


def _interval(low: float, low_in: bool, high: float, high_in: bool) -> str:
    if high == math.inf:
        return f"{'>=' if low_in else '>'} {low:g}"
    return f"in {'[' if low_in else '('}{low:g}, {high:g}{']' if high_in else ')'}"


def _check_range(key: str, value: Any) -> None:
    low, low_in, high, high_in, hint = _RANGES[key]
    if value is None:
        return
    ok = (value >= low if low_in else value > low) and (value <= high if high_in else value < high)
    if not ok or (isinstance(value, float) and math.isnan(value)):
        raise ConfigError(f"Config key {key!r} must be {_interval(low, low_in, high, high_in)} ({hint}), got {value}")


def _numbers(key: str, value: list, n: int, low: float, high: float, example: str) -> list[float]:
    """``value`` as ``n`` numbers in ``[low, high]``, else a ConfigError showing the expected form."""
    try:
        numbers = [float(v) for v in value if not isinstance(v, bool)]
    except (TypeError, ValueError):
        numbers = []
    if len(value) != n or len(numbers) != n or any(not low <= v <= high for v in numbers):
        raise ConfigError(f"Config key {key!r} must be {n} numbers in [{low:g}, {high:g}], e.g. {key}={example}, "
                          f"got {value}")
    return numbers


def _probe_int(key: str, value: Any, default: int) -> int:
    value = default if value is None else value
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        value = "x"
    try:
        number = int(value) if not isinstance(value, float) or value.is_integer() else None
    except ValueError:
        number = None
    if number is None or number < 1:
        raise ConfigError(f"probes.{key} must be an integer >= 1, got {value!r}; e.g. probes.{key}={default}")
    return number


def _validate(cfg: TrainConfig) -> None:
    """Every value in range and every combination possible, before any work starts (one-line errors)."""
    for key, choices in CHOICES.items():
        if getattr(cfg, key) not in choices:
            raise ConfigError(f"Config key {key!r} is {getattr(cfg, key)!r}; valid choices: {', '.join(choices)}")
    for key in _RANGES:
        _check_range(key, getattr(cfg, key))
    for key in ("model_kwargs", "data_options"):  # passed on as they are: at least no NaN / infinity in them
        for name, value in getattr(cfg, key).items():
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"Config key '{key}.{name}' must be a finite number, got {value}")
    cfg.scale = _numbers("scale", cfg.scale, 2, 0, 1, "[0.08,1.0]")
    if not 0 < cfg.scale[0] <= cfg.scale[1]:
        raise ConfigError(f"Config key 'scale' must be [min, max] with 0 < min <= max <= 1 (the crop's area "
                          f"fraction), e.g. scale=[0.08,1.0], got {cfg.scale}")
    if cfg.opt_betas is not None:
        cfg.opt_betas = _numbers("opt_betas", cfg.opt_betas, 2, 0, 0.999999, "[0.9,0.999]")
    if cfg.mean is not None:
        cfg.mean = _numbers("mean", cfg.mean, 3, 0, 1, "[0.485,0.456,0.406]")
    if cfg.std is not None:
        cfg.std = _numbers("std", cfg.std, 3, 0, math.inf, "[0.229,0.224,0.225]")
        if min(cfg.std) <= 0:
            raise ConfigError(f"Config key 'std' must be 3 positive numbers, e.g. std=[0.229,0.224,0.225], "
                              f"got {cfg.std}")
    if cfg.eval_interpolation is not None and cfg.eval_interpolation not in INTERPOLATIONS:
        raise ConfigError(f"Config key 'eval_interpolation' is {cfg.eval_interpolation!r}; valid choices: "
                          f"{', '.join(INTERPOLATIONS)} (or null: from `preprocess`)")
    for key in cfg.probes:
        if key not in PROBE_KEYS:
            raise _unknown("probes key", key, PROBE_KEYS)
    if cfg.probes:
        from vitscope.training.probes import list_probes

        measures = cfg.probes.get("measures", [])
        if isinstance(measures, str):
            measures = [m.strip() for m in measures.split(",") if m.strip()]
        if not isinstance(measures, list):
            raise ConfigError(f"probes.measures must be a list of probe names, e.g. "
                              f"probes.measures=[attention_entropy]; got {measures!r}")
        for m in measures:
            if m not in list_probes():
                raise _unknown("probe measure", str(m), list_probes())
        cfg.probes = {"every": _probe_int("every", cfg.probes.get("every"), 1), "measures": list(measures),
                      "num_images": _probe_int("num_images", cfg.probes.get("num_images"), 32)}


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
