"""The vocabulary of a search space: the trial-config keys it may search or fix, the parameter types
and the fields each kind of mapping allows. Plain constants; imports nothing."""

from __future__ import annotations

__all__ = ["TRIAL_CONFIG_KEYS", "PARAMETER_TYPES", "PARAMETER_FIELDS", "SPACE_FIELDS"]

# The flat trial-config keys of docs/contracts.md, in the table's order. trainables keeps the
# authoritative list (trainables.config); a test checks that the two agree.
TRIAL_CONFIG_KEYS: tuple[str, ...] = (
    "lam",
    "theta",
    "nu",
    "lr",
    "lr_slow_ratio",
    "momentum",
    "weight_decay",
    "optimizer",
    "adam_beta2",
    "latent_lr_ratio",
    "latent_weight_decay",
    "schedule",
    "lr_milestones",
    "lr_gamma",
    "warmup_epochs",
    "feature_loss_start_epoch",
    "center_lr",
    "mu_sigma_update",
    "sigma_min",
    "latent_init_scale",
    "w_init",
    "ste_clip",
    "act_clip",
    "model",
    "width",
    "block_style",
    "shortcut",
    "dropout",
    "binarize",
    "dataset",
    "data_root",
    "epochs",
    "batch_size",
    "seed",
    "val_fraction",
    "device",
    "amp",
    "channels_last",
    "compile",
    "cuda_graph",
    "fused_bonn",
    "hist_epochs",
    "num_threads",
)

PARAMETER_TYPES: tuple[str, ...] = ("float", "int", "categorical")

#: The fields a parameter of each type allows (``type`` first).
PARAMETER_FIELDS: dict[str, tuple[str, ...]] = {
    "float": ("type", "low", "high", "log", "step", "condition"),
    "int": ("type", "low", "high", "log", "step", "condition"),
    "categorical": ("type", "choices", "condition"),
}
#: The top-level fields of a space.
SPACE_FIELDS: tuple[str, ...] = ("name", "description", "parameters", "fixed", "warm_start")
