"""TrainConfig: the keys and defaults of docs/contracts.md, and every validation rule (a table)."""
import dataclasses
import json
import pickle
import re
from pathlib import Path

import numpy as np
import pytest

import trainables
from trainables.config import TRIAL_CONFIG_KEYS, ConfigError, TrainConfig

ROOT = Path(__file__).resolve().parents[2]

DEFAULTS = {
    "lam": 1e-4, "theta": 1e-3, "nu": 1e-4, "lr": 0.01, "lr_slow_ratio": 0.1, "momentum": 0.9,
    "weight_decay": 5e-4, "optimizer": "sgd", "adam_beta2": 0.999, "latent_lr_ratio": 1.0,
    "latent_weight_decay": None, "schedule": "step", "lr_milestones": [0.3, 0.6, 0.8], "lr_gamma": 0.2,
    "warmup_epochs": 0, "feature_loss_start_epoch": 0, "center_lr": 0.5, "mu_sigma_update": "sgd", "sigma_min": "auto",
    "latent_init_scale": 1.0, "w_init": "mean_abs", "ste_clip": 1.0, "act_clip": 1.0,
    "model": "small_cnn", "width": 16, "block_style": "plain", "shortcut": "fp_1x1", "dropout": 0.0,
    "binarize": "bonn", "dataset": "digits", "data_root": None, "epochs": 10, "batch_size": 128,
    "seed": 0, "val_fraction": 0.1, "device": "auto", "amp": "auto", "channels_last": "auto",
    "compile": False, "cuda_graph": "auto", "fused_bonn": "auto", "hist_epochs": [0, 2, 20, 200], "num_threads": 0,
}


def test_keys_match_the_contract_table():
    text = (ROOT / "docs" / "contracts.md").read_text()
    section = text.split("## Trial config", 1)[1].split("\n## ", 1)[0]
    documented = re.findall(r"^\| `([a-z0-9_]+)` \|", section, flags=re.M)
    assert documented, "could not read the contract table"
    assert list(TRIAL_CONFIG_KEYS) == documented
    assert trainables.TRIAL_CONFIG_KEYS == TRIAL_CONFIG_KEYS


def test_defaults():
    assert TrainConfig.from_dict({}).to_dict() == DEFAULTS
    assert TrainConfig.from_dict(None).to_dict() == DEFAULTS


def test_block_style_resolves_to_the_model_default():
    assert TrainConfig.from_dict({"model": "resnet18"}).block_style == "bireal_per_conv"
    assert TrainConfig.from_dict({"model": "wrn22"}).block_style == "preact"
    cfg = TrainConfig.from_dict({"model": "resnet18", "block_style": "two_conv_hardtanh"})
    assert cfg.block_style == "two_conv_hardtanh"


def test_round_trip_json_pickle_and_frozen():
    cfg = TrainConfig.from_dict({"lam": 1e-3, "lr_milestones": [0.5, 0.75], "model": "wrn22", "width": 64,
                                 "dataset": "cifar10", "data_root": "/data", "amp": True})
    d = json.loads(json.dumps(cfg.to_dict()))
    assert TrainConfig.from_dict(d) == cfg
    assert pickle.loads(pickle.dumps(cfg)) == cfg
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lam = 0.0  # type: ignore[misc]
    assert cfg.replace(lam=0.0).lam == 0.0


def test_lenient_but_exact_number_parsing():
    cfg = TrainConfig.from_dict({"lr": 1, "epochs": 10.0, "theta": np.float64(0.01), "seed": np.int64(3),
                                 "lr_milestones": (0.5,), "hist_epochs": [2, 0, 2]})
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.epochs == 10 and isinstance(cfg.epochs, int)
    assert cfg.theta == 0.01 and cfg.seed == 3
    assert cfg.lr_milestones == (0.5,) and cfg.hist_epochs == (0, 2)


CASES = [
    # (overrides, field, rule, value, message)
    ({"model": "vgg16"}, "model", "must be one of ['small_cnn', 'wrn22', 'resnet18']", "vgg16",
     "model: must be one of ['small_cnn', 'wrn22', 'resnet18'] (got 'vgg16')"),
    ({"dataset": "svhn"}, "dataset",
     "must be one of ['digits', 'mnist', 'fashion_mnist', 'cifar10', 'cifar100', 'npz', 'imagefolder']", "svhn",
     "dataset: must be one of ['digits', 'mnist', 'fashion_mnist', 'cifar10', 'cifar100', 'npz', "
     "'imagefolder'] (got 'svhn')"),
    ({"lam": -1e-4}, "lam", "must be >= 0", -1e-4, "lam: must be >= 0 (got -0.0001)"),
    ({"nu": 0}, "nu", "must be > 0", 0, "nu: must be > 0 (got 0)"),
    ({"nu": -1.0}, "nu", "must be > 0", -1.0, "nu: must be > 0 (got -1.0)"),
    ({"theta": -0.5}, "theta", "must be >= 0", -0.5, "theta: must be >= 0 (got -0.5)"),
    ({"dataset": "cifar10"}, "data_root", "required for dataset 'cifar10'", None,
     "data_root: required for dataset 'cifar10' (got None)"),
    ({"val_fraction": 0.0}, "val_fraction", "must be in (0, 1)", 0.0, "val_fraction: must be in (0, 1) (got 0.0)"),
    ({"val_fraction": 1}, "val_fraction", "must be in (0, 1)", 1, "val_fraction: must be in (0, 1) (got 1)"),
    ({"val_fraction": -0.1}, "val_fraction", "must be in (0, 1)", -0.1,
     "val_fraction: must be in (0, 1) (got -0.1)"),
    ({"lamda": 1e-3}, "lamda", "unknown trial-config key (did you mean 'lam'?)", 1e-3,
     "lamda: unknown trial-config key (did you mean 'lam'?) (got 0.001)"),
    ({"foo": 1}, "foo", "unknown trial-config key", 1, "foo: unknown trial-config key (got 1)"),
    ({"lr": 0}, "lr", "must be > 0", 0, "lr: must be > 0 (got 0)"),
    ({"lr": "0.1"}, "lr", "must be a number", "0.1", "lr: must be a number (got '0.1')"),
    ({"lr": float("nan")}, "lr", "must be finite", float("nan"), "lr: must be finite (got nan)"),
    ({"lr_slow_ratio": 0.0}, "lr_slow_ratio", "must be > 0", 0.0, "lr_slow_ratio: must be > 0 (got 0.0)"),
    ({"momentum": 1.0}, "momentum", "must be in [0, 1)", 1.0, "momentum: must be in [0, 1) (got 1.0)"),
    ({"weight_decay": -1e-5}, "weight_decay", "must be >= 0", -1e-5, "weight_decay: must be >= 0 (got -1e-05)"),
    ({"schedule": "linear"}, "schedule", "must be one of ['step', 'cosine']", "linear",
     "schedule: must be one of ['step', 'cosine'] (got 'linear')"),
    ({"lr_milestones": [0.6, 0.3]}, "lr_milestones", "must be strictly increasing", [0.6, 0.3],
     "lr_milestones: must be strictly increasing (got [0.6, 0.3])"),
    ({"lr_milestones": [0.3, 1.2]}, "lr_milestones", "must be a list of numbers in (0, 1)", [0.3, 1.2],
     "lr_milestones: must be a list of numbers in (0, 1) (got [0.3, 1.2])"),
    ({"lr_gamma": 0}, "lr_gamma", "must be in (0, 1]", 0, "lr_gamma: must be in (0, 1] (got 0)"),
    ({"warmup_epochs": -1}, "warmup_epochs", "must be an integer >= 0", -1,
     "warmup_epochs: must be an integer >= 0 (got -1)"),
    ({"feature_loss_start_epoch": 1.5}, "feature_loss_start_epoch", "must be an integer", 1.5,
     "feature_loss_start_epoch: must be an integer (got 1.5)"),
    ({"center_lr": 0}, "center_lr", "must be > 0", 0, "center_lr: must be > 0 (got 0)"),
    ({"mu_sigma_update": "ema"}, "mu_sigma_update", "must be one of ['sgd', 'closed_form']", "ema",
     "mu_sigma_update: must be one of ['sgd', 'closed_form'] (got 'ema')"),
    ({"width": 0}, "width", "must be an integer >= 1", 0, "width: must be an integer >= 1 (got 0)"),
    ({"block_style": "two_conv_hardtanh"}, "block_style", "must be one of ['plain'] for model 'small_cnn'",
     "two_conv_hardtanh", "block_style: must be one of ['plain'] for model 'small_cnn' (got 'two_conv_hardtanh')"),
    ({"model": "resnet18", "block_style": "reactnet"}, "block_style",
     "must be one of ['bireal_per_conv', 'two_conv_hardtanh'] for model 'resnet18'", "reactnet",
     "block_style: must be one of ['bireal_per_conv', 'two_conv_hardtanh'] for model 'resnet18' (got 'reactnet')"),
    ({"shortcut": "binary_1x1"}, "shortcut", "must be one of ['fp_1x1', 'avgpool_pad']", "binary_1x1",
     "shortcut: must be one of ['fp_1x1', 'avgpool_pad'] (got 'binary_1x1')"),
    ({"dropout": 1.0}, "dropout", "must be in [0, 1)", 1.0, "dropout: must be in [0, 1) (got 1.0)"),
    ({"binarize": "dorefa"}, "binarize", "must be one of ['bonn', 'xnor', 'none']", "dorefa",
     "binarize: must be one of ['bonn', 'xnor', 'none'] (got 'dorefa')"),
    ({"epochs": 0}, "epochs", "must be an integer >= 1", 0, "epochs: must be an integer >= 1 (got 0)"),
    ({"batch_size": True}, "batch_size", "must be an integer", True, "batch_size: must be an integer (got True)"),
    ({"device": "tpu"}, "device", "must be one of ['auto', 'cpu', 'cuda']", "tpu",
     "device: must be one of ['auto', 'cpu', 'cuda'] (got 'tpu')"),
    ({"amp": "yes"}, "amp", "must be true, false or 'auto'", "yes", "amp: must be true, false or 'auto' (got 'yes')"),
    ({"compile": 1}, "compile", "must be true or false", 1, "compile: must be true or false (got 1)"),
    ({"hist_epochs": [0, -2]}, "hist_epochs", "must be a list of integers >= 0", [0, -2],
     "hist_epochs: must be a list of integers >= 0 (got [0, -2])"),
    ({"num_threads": -1}, "num_threads", "must be an integer >= 0", -1, "num_threads: must be an integer >= 0 (got -1)"),
    ({"data_root": ""}, "data_root", "must be a non-empty string or null", "",
     "data_root: must be a non-empty string or null (got '')"),
]


@pytest.mark.parametrize("overrides, field, rule, value, message", CASES,
                         ids=[f"{c[1]}-{i}" for i, c in enumerate(CASES)])
def test_validation_table(overrides, field, rule, value, message):
    with pytest.raises(ConfigError) as ei:
        TrainConfig.from_dict(overrides)
    err = ei.value
    assert isinstance(err, ValueError)
    assert str(err) == message
    assert (err.field, err.rule) == (field, rule)
    assert err.value == value or (value != value and err.value != err.value)  # NaN


def test_missing_data_root_path_names_data_root(tmp_path):
    from trainables.data import load_host_data

    missing = str(tmp_path / "nowhere")
    with pytest.raises(ConfigError) as ei:
        load_host_data(TrainConfig.from_dict({"dataset": "cifar10", "data_root": missing}))
    assert ei.value.field == "data_root"
    assert str(ei.value) == f"data_root: path does not exist (got {missing!r})"


def test_config_error_pickles_with_its_fields():
    err = pickle.loads(pickle.dumps(ConfigError("lam", "must be >= 0", -1)))
    assert (err.field, err.rule, err.value, str(err)) == ("lam", "must be >= 0", -1, "lam: must be >= 0 (got -1)")
    assert trainables.ConfigError is ConfigError


def test_sigma_min_is_auto_or_a_positive_number():
    cfg = TrainConfig.from_dict({})
    assert cfg.sigma_min == "auto" and cfg.sigma_floor() == 1e-4  # the paper's point: sqrt(lr lam nu) = 1e-5
    big = TrainConfig.from_dict({"lr": 0.6, "lam": 1.3e-3, "nu": 8.2e-3})
    assert big.sigma_floor() == pytest.approx((0.6 * 1.3e-3 * 8.2e-3) ** 0.5)
    assert TrainConfig.from_dict({"lr": 0.6, "latent_lr_ratio": 0.1, "lam": 1.3e-3, "nu": 8.2e-3}).sigma_floor() \
        == pytest.approx((0.06 * 1.3e-3 * 8.2e-3) ** 0.5)
    assert TrainConfig.from_dict({"sigma_min": 0.003, "lr": 0.6}).sigma_floor() == 0.003
    for bad in (0, -1e-4, "never", float("nan")):
        with pytest.raises(ConfigError, match="sigma_min"):
            TrainConfig.from_dict({"sigma_min": bad})
