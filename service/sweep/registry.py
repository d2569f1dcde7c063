"""The study's model in the MLflow Model Registry: the best trial's best checkpoint, registered.

At the end of a successful study the driver logs the best trial's best checkpoint as an MLflow
PyTorch model under that trial's run and registers it as ``bonn-sweep-<study name>``
(:func:`register_best`); the model version is tagged with the study, trial, objective and checkpoint,
and the Optuna study gets the user attrs ``registered_model`` (``"name/version"``) and
``registered_trial``, so a resumed driver does not register it twice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from service.core.mlflow_calls import mlflow_call
from service.core.payload import JobPayload
from service.sweep.tuner import join_uri


def registered_model_name(study_name: str) -> str:
    safe = "-".join(str(study_name).split())
    return f"bonn-sweep-{safe}"


def inference_model(model):
    """The model as the Model Registry serves it: ``forward(x) -> logits``.

    trainables' classifiers return ``(features, logits)`` (the feature loss needs the features); a
    registered model should answer with logits only, for ``mlflow.pytorch`` and ``mlflow.pyfunc`` alike.
    """
    import torch

    class LogitsOnly(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            out = self.net(x)
            return out[-1] if isinstance(out, (tuple, list)) else out

    LogitsOnly.__qualname__ = LogitsOnly.__name__ = "BonnSweepLogitsOnly"
    return LogitsOnly(model).eval()


def register_best(p: JobPayload, client: Any, study, best, echo: Callable[[str], None],
                  extra_tags: dict[str, Any] | None = None) -> str:
    """Log the best trial's checkpoint (the one ``objective.selection`` picks) as an MLflow PyTorch model
    under its run and register it. ``best`` is an Optuna trial, or any object with ``number``,
    ``value`` and ``user_attrs`` (a confirmation run: ``service.sweep.confirm``); ``extra_tags`` go on
    the model version too (e.g. ``test_acc``). Returns ``"name/version"``."""
    import mlflow

    def quiet(what: str, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        return mlflow_call(what, fn, *args, warn=echo, **kwargs)

    name = registered_model_name(p.study_spec.name)
    existing = study.user_attrs.get("registered_model")
    if existing and study.user_attrs.get("registered_trial") == best.number:
        return existing  # a resumed driver after a successful registration
    run_id = best.user_attrs.get("mlflow_run_id")
    if not run_id:
        raise RuntimeError(f"best trial #{best.number} has no MLflow run")
    ckpt = fetch_checkpoint(p, best, echo)
    import trainables

    model, config = trainables.load_checkpoint_model(ckpt)
    # a local class: cloudpickle stores it by value, so loading needs torch + trainables only
    model = inference_model(model.to("cpu").eval())
    mlflow.set_tracking_uri(p.mlflow_tracking_uri)
    run = client.get_run(run_id)
    status = run.info.status
    code_paths = [str(Path(trainables.__file__).resolve().parent)]
    import torch

    try:
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pytorch.log_model(
                model,
                name="model",
                registered_model_name=name,
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "numpy"],
                code_paths=code_paths,
                # mlflow 3.17 defaults to "pt2", which traces forward() and needs an input example;
                # the pickled module (+ the trainables package as code) loads anywhere
                serialization_format="pickle",
                await_registration_for=120,
            )
    finally:
        if status != "RUNNING":
            quiet("set_terminated(best run)", client.set_terminated, run_id, status=status)
    version = getattr(info, "registered_model_version", None)
    if version is None:
        versions = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
        version = max(int(v.version) for v in versions)
    for k, v in {
        "study_id": p.study_id,
        "optuna_trial": best.number,
        "tune_trial_id": best.user_attrs.get("tune_trial_id", ""),
        "objective": f"{p.study_spec.objective.metric}={best.values[0]}",
        "best_epoch": best.user_attrs.get("best_epoch", ""),
        "checkpoint_uri": best.user_attrs.get("checkpoint_uri", ""),
        **(extra_tags or {}),
    }.items():
        quiet("set_model_version_tag", client.set_model_version_tag, name, str(version), k, str(v))
    ref = f"{name}/{version}"
    study.set_user_attr("registered_model", ref)
    study.set_user_attr("registered_trial", best.number)
    return ref


def fetch_checkpoint(p: JobPayload, best, echo: Callable[[str], None]) -> str:
    """Local path of the best trial's best checkpoint.pt: from MLflow, else Tune's storage."""
    import mlflow

    uri = best.user_attrs.get("checkpoint_uri")
    if uri:
        try:
            return mlflow.artifacts.download_artifacts(artifact_uri=f"{uri.rstrip('/')}/checkpoint.pt",
                                                       tracking_uri=p.mlflow_tracking_uri)
        except Exception as exc:  # noqa: BLE001
            echo(f"warning: could not download {uri}: {exc}; trying Tune's checkpoint")
    tid = best.user_attrs.get("tune_trial_id")
    exp = Path(join_uri(p.tune_storage, best.user_attrs.get("tune_experiment") or p.study_id))
    if tid and exp.is_dir():
        cands = sorted(exp.glob(f"*{tid}*/checkpoint_*/checkpoint.pt"))
        if cands:
            return str(cands[-1])
    raise RuntimeError(f"no checkpoint found for best trial #{best.number}")
