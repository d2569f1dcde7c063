"""The flat trial config: one frozen dataclass made of chapters, validated chapter by chapter.

`TrainConfig.from_dict(d)` is the only way in. Missing keys take the defaults below (the paper's
CIFAR/WRN values where the paper states one, see docs/contracts.md); unknown keys and every broken
rule raise `ConfigError` whose message is ``"<field>: <rule> (got <value>)"``.

The keys stay flat (the contract: `TRIAL_CONFIG_KEYS`, in the order of the table in
docs/contracts.md); for reading, they are declared in chapters, one small frozen dataclass each,
which `TrainConfig` inherits: BONN loss weights, optimiser, lr schedule, BONN update rules, model,
data and run length, runtime. Each chapter has its validation function (field rules) and, where
fields of the chapter depend on each other, a check that runs after every field has passed.

Choices this module makes where the contract is silent (all visible in `to_dict()` and logged by `fit`):

- `block_style=None` resolves to the model's default (`resnet18`: ``bireal_per_conv``; `wrn22`:
  ``preact``; `small_cnn`: ``plain``), so the logged config always names the block actually built.
- Numbers from JSON/YAML/Optuna are accepted when they are exact: ``10.0`` is a valid `epochs`, ``1``
  a valid `lr`; booleans are never numbers.
- `lr_milestones` must be strictly increasing; `hist_epochs` entries must be >= 0.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

__all__ = ["ConfigError", "TrainConfig", "TRIAL_CONFIG_KEYS", "MODELS", "DATASETS", "BLOCK_STYLES",
           "LossWeightsConfig", "OptimiserConfig", "ScheduleConfig", "BonnUpdatesConfig", "ModelConfig", "DataConfig",
           "RuntimeConfig"]


class ConfigError(ValueError):
    """A trial-config value that breaks a rule. Message: ``"<field>: <rule> (got <value>)"``."""

    def __init__(self, field: str, rule: str, value: Any):
        self.field = field
        self.rule = rule
        self.value = value
        super().__init__(f"{field}: {rule} (got {value!r})")

    def __reduce__(self):  # picklable across Ray workers
        return (type(self), (self.field, self.rule, self.value))


MODELS = ("small_cnn", "wrn22", "resnet18")
DATASETS = ("digits", "mnist", "fashion_mnist", "cifar10", "cifar100", "npz", "imagefolder")
BINARIZE = ("bonn", "xnor", "none")
SCHEDULES = ("step", "cosine")
OPTIMIZERS = ("sgd", "adam", "adamw")
SHORTCUTS = ("fp_1x1", "avgpool_pad")
MU_SIGMA_UPDATES = ("sgd", "closed_form")
DEVICES = ("auto", "cpu", "cuda")
#: block styles per model; the first one is the model's default
BLOCK_STYLES = {
    "small_cnn": ("plain",),
    "wrn22": ("preact", "bireal_per_conv"),
    "resnet18": ("bireal_per_conv", "two_conv_hardtanh"),
}


# ====================================================================== field rules (shared)
def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _float(name: str, v: Any) -> float:
    if not _is_real(v) and hasattr(v, "item") and not isinstance(v, (str, bytes)):
        v = v.item()  # numpy scalars from samplers
    if not _is_real(v):
        raise ConfigError(name, "must be a number", v)
    v = float(v)
    if not math.isfinite(v):
        raise ConfigError(name, "must be finite", v)
    return v


def _int(name: str, v: Any) -> int:
    if not _is_real(v) and hasattr(v, "item") and not isinstance(v, (str, bytes)):
        v = v.item()
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if not isinstance(v, int) or isinstance(v, bool):
        raise ConfigError(name, "must be an integer", v)
    return v


def _bool(name: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise ConfigError(name, "must be true or false", v)
    return v


def _ge(lo):
    def rule(name, v):
        x = _float(name, v)
        if x < lo:
            raise ConfigError(name, f"must be >= {lo}", v)
        return x
    return rule


def _gt(lo):
    def rule(name, v):
        x = _float(name, v)
        if x <= lo:
            raise ConfigError(name, f"must be > {lo}", v)
        return x
    return rule


def _interval(lo, hi, closed_lo=False, closed_hi=False):
    text = f"{'[' if closed_lo else '('}{lo}, {hi}{']' if closed_hi else ')'}"

    def rule(name, v):
        x = _float(name, v)
        ok_lo = x >= lo if closed_lo else x > lo
        ok_hi = x <= hi if closed_hi else x < hi
        if not (ok_lo and ok_hi):
            raise ConfigError(name, f"must be in {text}", v)
        return x
    return rule


def _int_ge(lo):
    def rule(name, v):
        x = _int(name, v)
        if x < lo:
            raise ConfigError(name, f"must be an integer >= {lo}", v)
        return x
    return rule


def _any_int(name, v):
    return _int(name, v)


def _choice(options):
    def rule(name, v):
        if v not in options:
            raise ConfigError(name, f"must be one of {list(options)}", v)
        return v
    return rule


def _fused_bonn(name, v):
    if v in ("auto", "compiled") or isinstance(v, bool):
        return v
    raise ConfigError(name, "must be true, false, 'compiled' or 'auto'", v)


def _bool_or_auto(name, v):
    if v == "auto" or isinstance(v, bool):
        return v
    raise ConfigError(name, "must be true, false or 'auto'", v)


def _optional_str(name, v):
    if v is None:
        return None
    if not isinstance(v, str) or not v:
        raise ConfigError(name, "must be a non-empty string or null", v)
    return v


def _milestones(name, v):
    if isinstance(v, (str, bytes)) or not hasattr(v, "__iter__"):
        raise ConfigError(name, "must be a list of numbers in (0, 1)", v)
    items = list(v)
    out = []
    for x in items:
        if not _is_real(x) or not 0.0 < float(x) < 1.0:
            raise ConfigError(name, "must be a list of numbers in (0, 1)", v)
        out.append(float(x))
    if any(b <= a for a, b in zip(out, out[1:])):
        raise ConfigError(name, "must be strictly increasing", v)
    return tuple(out)


def _hist_epochs(name, v):
    if isinstance(v, (str, bytes)) or not hasattr(v, "__iter__"):
        raise ConfigError(name, "must be a list of integers >= 0", v)
    out = []
    for x in v:
        if isinstance(x, float) and x.is_integer():
            x = int(x)
        if not isinstance(x, int) or isinstance(x, bool) or x < 0:
            raise ConfigError(name, "must be a list of integers >= 0", v)
        out.append(x)
    return tuple(sorted(set(out)))


def _optional_ge0(name, v):
    if v is None:
        return None
    return _ge(0)(name, v)


def _word_or_positive(word: str):
    """Rule: the string ``word``, or a finite number > 0 (as a float)."""
    def rule(name, v):
        if v == word:
            return v
        if _is_real(v) and math.isfinite(float(v)) and float(v) > 0:
            return float(v)
        raise ConfigError(name, f"must be '{word}' or a number > 0", v)
    return rule


_sigma_min = _word_or_positive("auto")
_w_init = _word_or_positive("mean_abs")


Rules = Mapping[str, Callable[[str, Any], Any]]


def _apply(rules: Rules, values: Mapping[str, Any]) -> dict[str, Any]:
    """Every field of ``rules`` validated (and normalised) by its rule, in declaration order."""
    return {name: rule(name, values[name]) for name, rule in rules.items()}


# ====================================================================== chapter 1: BONN loss weights
@dataclass(frozen=True)
class LossWeightsConfig:
    """The weights of BONN's Bayesian losses in the full objective (docs/bonn-method.md section 2.2):
    ``lam`` (lambda) of the kernel loss, ``theta`` of the feature loss (0: off), ``nu`` the variance of
    the quantization error inside the kernel loss."""

    lam: float = 1e-4
    theta: float = 1e-3
    nu: float = 1e-4


def _validate_loss_weights(v: Mapping[str, Any]) -> dict[str, Any]:
    return _apply({"lam": _ge(0), "theta": _ge(0), "nu": _gt(0)}, v)


# ====================================================================== chapter 2: optimiser
@dataclass(frozen=True)
class OptimiserConfig:
    """The optimiser and its parameter groups (``trainables.optim``): base ``lr``; ``lr_slow_ratio``
    scales it for ``w``, ``sigma`` and ``log_var`` (the paper: 0.01 vs 0.1); ``momentum`` (Adam's
    beta1); ``weight_decay``; ``optimizer`` sgd | adam | adamw (``adam_beta2``); the latent kernels'
    own lr ratio and weight decay (``latent_weight_decay`` null: ``weight_decay``)."""

    lr: float = 0.01
    lr_slow_ratio: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    optimizer: str = "sgd"
    adam_beta2: float = 0.999
    latent_lr_ratio: float = 1.0
    latent_weight_decay: float | None = None


def _validate_optimiser(v: Mapping[str, Any]) -> dict[str, Any]:
    return _apply({"lr": _gt(0), "lr_slow_ratio": _gt(0), "momentum": _interval(0, 1, closed_lo=True),
                   "weight_decay": _ge(0), "optimizer": _choice(OPTIMIZERS), "adam_beta2": _interval(0, 1),
                   "latent_lr_ratio": _gt(0), "latent_weight_decay": _optional_ge0}, v)


# ====================================================================== chapter 3: lr schedule
@dataclass(frozen=True)
class ScheduleConfig:
    """The per-step lr factor (``trainables.schedule``): ``step`` (times ``lr_gamma`` at each fraction
    of ``lr_milestones`` of the epochs) or ``cosine``, after an optional linear warm-up of
    ``warmup_epochs``."""

    schedule: str = "step"
    lr_milestones: tuple[float, ...] = (0.3, 0.6, 0.8)
    lr_gamma: float = 0.2
    warmup_epochs: int = 0


def _validate_schedule(v: Mapping[str, Any]) -> dict[str, Any]:
    return _apply({"schedule": _choice(SCHEDULES), "lr_milestones": _milestones,
                   "lr_gamma": _interval(0, 1, closed_hi=True), "warmup_epochs": _int_ge(0)}, v)


# ====================================================================== chapter 4: BONN update rules
@dataclass(frozen=True)
class BonnUpdatesConfig:
    """When and how BONN's own terms and parameters move: the feature loss from epoch
    ``feature_loss_start_epoch`` (0-based), the class centres by the center-loss rule at the fixed rate
    ``center_lr``, ``mu``/``sigma`` by the optimiser (``sgd``) or set to their exact minimisers after
    each step (``closed_form``), and kept at ``sigma >= sigma_min`` after each step. The paper keeps
    sigma positive without a bound; near 0 the prior term's stiffness ``lam nu / sigma^2`` has no limit
    and SGD diverges once ``lr lam nu / sigma^2`` is large (benchmarks/RESULTS.md, "A floor under the
    prior's sigma"). ``auto`` = ``max(1e-4, sqrt(lr * latent_lr_ratio * lam * nu))``: the sigma at which
    one latent-kernel step of the prior term is at most 1x its distance to mu (:meth:`TrainConfig.sigma_floor`)."""

    feature_loss_start_epoch: int = 0
    center_lr: float = 0.5
    mu_sigma_update: str = "sgd"
    sigma_min: float | str = "auto"


def _validate_bonn_updates(v: Mapping[str, Any]) -> dict[str, Any]:
    return _apply({"feature_loss_start_epoch": _int_ge(0), "center_lr": _gt(0),
                   "mu_sigma_update": _choice(MU_SIGMA_UPDATES), "sigma_min": _sigma_min}, v)


# ====================================================================== chapter 5: model
@dataclass(frozen=True)
class ModelConfig:
    """The network (``trainables.models``) and its binary layers (``trainables.layers``): the choices
    the paper leaves open for the binary layers (latent init scale, initial ``w``, the STE bounds of
    the weights and the activations), then ``model``, ``width``, ``block_style`` (null: the model's
    default), ``shortcut``, ``dropout`` and ``binarize`` (bonn | xnor | none)."""

    latent_init_scale: float = 1.0
    w_init: float | str = "mean_abs"
    ste_clip: float = 1.0
    act_clip: float = 1.0
    model: str = "small_cnn"
    width: int = 16
    block_style: str | None = None
    shortcut: str = "fp_1x1"
    dropout: float = 0.0
    binarize: str = "bonn"


def _validate_model(v: Mapping[str, Any]) -> dict[str, Any]:
    return _apply({"latent_init_scale": _gt(0), "w_init": _w_init, "ste_clip": _gt(0), "act_clip": _gt(0),
                   "model": _choice(MODELS), "width": _int_ge(1), "block_style": _optional_str,
                   "shortcut": _choice(SHORTCUTS), "dropout": _interval(0, 1, closed_lo=True),
                   "binarize": _choice(BINARIZE)}, v)


def _check_model(out: dict[str, Any]) -> None:
    """``block_style`` against ``model``; null resolves to the model's default (in place)."""
    styles = BLOCK_STYLES[out["model"]]
    if out["block_style"] is None:
        out["block_style"] = styles[0]
    elif out["block_style"] not in styles:
        raise ConfigError("block_style", f"must be one of {list(styles)} for model {out['model']!r}",
                          out["block_style"])


# ====================================================================== chapter 6: data and run length
@dataclass(frozen=True)
class DataConfig:
    """The data (``trainables.data``; docs/data.md) and how long and in what order it is seen:
    ``dataset`` and its ``data_root``, ``epochs``, the global ``batch_size``, ``seed`` (weights, data
    order, augmentation, validation split) and ``val_fraction``."""

    dataset: str = "digits"
    data_root: str | None = None
    epochs: int = 10
    batch_size: int = 128
    seed: int = 0
    val_fraction: float = 0.1


def _validate_data(v: Mapping[str, Any]) -> dict[str, Any]:
    return _apply({"dataset": _choice(DATASETS), "data_root": _optional_str, "epochs": _int_ge(1),
                   "batch_size": _int_ge(1), "seed": _any_int, "val_fraction": _interval(0, 1)}, v)


def _check_data(out: dict[str, Any]) -> None:
    if out["dataset"] != "digits" and out["data_root"] is None:
        raise ConfigError("data_root", f"required for dataset {out['dataset']!r}", None)


# ====================================================================== chapter 7: runtime
@dataclass(frozen=True)
class RuntimeConfig:
    """Where and how fast it runs (same numbers, to rounding, whatever is chosen): ``device``, bf16
    ``amp``, ``channels_last``, ``compile`` (torch.compile the model), ``cuda_graph`` (capture the
    step), ``fused_bonn`` (true | false | "compiled" | "auto": all BONN layers in one autograd node,
    ``trainables.fast``); and the outputs/threads: ``hist_epochs``, ``num_threads`` (0: as is)."""

    device: str = "auto"
    amp: bool | str = "auto"
    channels_last: bool | str = "auto"
    compile: bool = False
    cuda_graph: bool | str = "auto"
    fused_bonn: bool | str = "auto"  # true | false | "compiled" | "auto"
    hist_epochs: tuple[int, ...] = (0, 2, 20, 200)
    num_threads: int = 0


def _validate_runtime(v: Mapping[str, Any]) -> dict[str, Any]:
    return _apply({"device": _choice(DEVICES), "amp": _bool_or_auto, "channels_last": _bool_or_auto,
                   "compile": _bool, "cuda_graph": _bool_or_auto, "fused_bonn": _fused_bonn,
                   "hist_epochs": _hist_epochs, "num_threads": _int_ge(0)}, v)


# ====================================================================== the config
#: (chapter, its field rules, its check after every field has passed), in the contract's key order
_CHAPTERS: tuple[tuple[type, Callable, Callable | None], ...] = (
    (LossWeightsConfig, _validate_loss_weights, None),
    (OptimiserConfig, _validate_optimiser, None),
    (ScheduleConfig, _validate_schedule, None),
    (BonnUpdatesConfig, _validate_bonn_updates, None),
    (ModelConfig, _validate_model, _check_model),
    (DataConfig, _validate_data, _check_data),
    (RuntimeConfig, _validate_runtime, None),
)


@dataclass(frozen=True)
class TrainConfig(RuntimeConfig, DataConfig, ModelConfig, BonnUpdatesConfig, ScheduleConfig, OptimiserConfig,
                  LossWeightsConfig):
    """One trial's config: every chapter's fields, flat (``cfg.lr``, ``cfg.model``, ...).

    The chapters are listed last-first because a dataclass takes its bases' fields in reverse method
    resolution order: the fields come out chapter 1 first, in the order of ``TRIAL_CONFIG_KEYS``."""

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None = None) -> "TrainConfig":
        d = dict(d or {})
        for key in d:
            if key not in TRIAL_CONFIG_KEYS:
                close = difflib.get_close_matches(str(key), TRIAL_CONFIG_KEYS, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ConfigError(str(key), f"unknown trial-config key{hint}", d[key])
        values = {f.name: f.default for f in dataclasses.fields(cls)}
        values.update(d)
        out: dict[str, Any] = {}
        for _, validate, _check in _CHAPTERS:  # every field rule first, chapter by chapter
            out.update(validate(values))
        for _, _validate, check in _CHAPTERS:  # then the checks between fields
            if check is not None:
                check(out)
        return cls(**out)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples become lists)."""
        return {
            k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()
        }

    def replace(self, **changes: Any) -> "TrainConfig":
        """A validated copy with some fields changed."""
        return TrainConfig.from_dict({**self.to_dict(), **changes})

    def sigma_floor(self) -> float:
        """``sigma_min`` as a number: ``auto`` = ``max(1e-4, sqrt(lr * latent_lr_ratio * lam * nu))``."""
        if self.sigma_min != "auto":
            return float(self.sigma_min)
        return max(1e-4, math.sqrt(self.lr * self.latent_lr_ratio * self.lam * self.nu))


TRIAL_CONFIG_KEYS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(TrainConfig))
assert TRIAL_CONFIG_KEYS == tuple(f.name for chapter, _, _ in _CHAPTERS for f in dataclasses.fields(chapter))
# every field has a rule: a chapter's validator returns exactly its fields (a field left out of its rules
# would otherwise keep an unvalidated value through ``cls(**out)``)
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
assert all(set(validate(_DEFAULTS)) == {f.name for f in dataclasses.fields(chapter)}
           for chapter, validate, _ in _CHAPTERS), "a TrainConfig field without a validation rule"
