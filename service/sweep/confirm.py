"""The confirmation stage of a study (StudySpec ``confirm``): the search's answer, trained again over seeds.

After the search, :func:`make_plan` picks the ``top_k`` COMPLETE trials by the objective (on the
validation split) and the search space's first warm-start point (the paper's own values, ``reference``),
rebuilds each one's trial config and gives each ``seeds`` fresh seeds (the search's ``seed`` + 1, + 2,
...; the same seeds for every configuration) at ``confirm.epochs`` (default: the trial's ``epochs``).
:func:`run_confirmation` trains these runs as a Ray Tune experiment of their own, ``<study_id>-confirm``
in the study's Tune storage, with the trials' trainable and resources, FIFO, at most
``max_concurrent_trials`` at once, the MLflow callback (child runs of the same parent run, tag
``bonn_sweep.stage=confirm``, ``confirm.config``, ``confirm.seed``), SIGINT cancel and Tune restore.

A confirmation run is judged at its **last** epoch, whatever ``objective.selection`` says: it runs the
full budget, and the test split is evaluated once, at that epoch, by ``trainables.fit`` (``test_acc``).
Test accuracy is never used for a choice: the confirmed best configuration is the candidate with the
highest mean validation accuracy, and the model registered is its seed run with the highest validation
accuracy (:func:`registered_run`).

State lives in the Optuna study's user attrs (the API reads them, like it reads trials):
``confirm_plan`` (the plan, fixed once made), ``confirm_runs`` (``"<label>/seed<s>"`` -> the finished
run: seed, val_acc, test_acc, MLflow run, checkpoint; written once, never twice) and ``confirmation``
(the summary of :func:`service.sweep.confirm_stats.summarize`, rewritten after every finished run).
``search_done`` marks a search that ended: a resume then goes straight on with the confirmation. The
plan is made once; a resume that extends ``num_trials`` searches further and then plans again (a new
Tune experiment ``<study_id>-confirm-<num_trials>``; runs already recorded are not repeated).
A run already in ``confirm_runs`` is never started again, also when the Tune state is older than it
(a killed driver).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import tempfile
from typing import Any, Callable

import optuna
from optuna.trial import TrialState
from ray.tune import Callback
from ray.tune.search import ConcurrencyLimiter, Searcher

from service.core.payload import JobPayload
from service.sweep.confirm_stats import summarize
from service.sweep.stop_reasons import epochs_done, finite

logger = logging.getLogger("bonn_sweep.confirm")

PLAN_ATTR, RUNS_ATTR, SUMMARY_ATTR, SEARCH_DONE_ATTR = "confirm_plan", "confirm_runs", "confirmation", "search_done"
STAGE = "confirm"


def experiment_name(study_id: str, num_trials: int | None = None) -> str:
    """``<study_id>-confirm``; a plan remade after a resume extended the search: ``-confirm-<num_trials>``."""
    return f"{study_id}-confirm" + (f"-{num_trials}" if num_trials else "")


# -- the plan ------------------------------------------------------------------------------------------


def trial_config(p: JobPayload, params: dict[str, Any]) -> dict[str, Any]:
    """The trial config a search trial with ``params`` trained with: ``{**fixed, **params, **base}``
    (the define-by-run space replayed on ``params`` for its fixed values)."""
    from service.sweep.searcher import DefineByRun

    extra = DefineByRun(p.study_spec.space, drop_keys=p.trial_defaults.keys())(optuna.trial.FixedTrial(params))
    return {**p.trial_defaults, **params, **(extra or {})}


def _reference_params(p: JobPayload, study: optuna.Study) -> dict[str, Any] | None:
    points = list(getattr(p.study_spec.space, "warm_start_points", None) or [])
    if not points:
        return None
    point = dict(points[0])
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        if t.params and all(t.params.get(k) == v for k, v in point.items()):
            return dict(t.params)  # the enqueued warm-start trial (parameters the point left open sampled)
    return point


def make_plan(p: JobPayload, study: optuna.Study) -> dict[str, Any]:
    """The configurations and seeds to confirm (see the module docstring)."""
    spec = p.study_spec
    conf = spec.confirm
    # the primary objective (``values[0]``; ``value`` raises on a multi-objective study's trials)
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.values]
    done.sort(key=lambda t: (-t.values[0] if spec.objective.mode == "max" else t.values[0], t.number))
    configs: list[dict[str, Any]] = []
    seen: dict[str, dict[str, Any]] = {}
    for t in done:
        key = json.dumps(t.params, sort_keys=True, default=str)
        if key in seen:
            continue
        c = {"label": f"trial #{t.number}", "role": "candidate", "trial": t.number, "params": dict(t.params),
             "search_value": t.values[0]}
        seen[key] = c
        configs.append(c)
        if len(configs) >= conf.top_k:
            break
    ref = _reference_params(p, study) if conf.reference else None
    if ref is not None:
        key = json.dumps(ref, sort_keys=True, default=str)
        if key in seen:
            seen[key]["role"] = "candidate+reference"  # the search's pick is the paper's point itself
        else:
            configs.append({"label": "reference", "role": "reference", "trial": None, "params": ref,
                            "search_value": None})
    base_seed = int(p.trial_defaults.get("seed", 0))
    epochs = int(conf.epochs or p.epochs)
    old = study.user_attrs.get(PLAN_ATTR)
    return {"configs": configs, "seeds": [base_seed + 1 + i for i in range(conf.seeds)], "epochs": epochs,
            "experiment": experiment_name(p.study_id, p.trials_requested if old else None),
            "objective": spec.objective.metric, "num_trials": p.trials_requested}


def plan_entries(p: JobPayload, plan: dict[str, Any]) -> list[dict[str, Any]]:
    """One entry per run: ``{"key", "label", "seed", "config"}``."""
    out = []
    for c in plan["configs"]:
        base = trial_config(p, c["params"])
        for s in plan["seeds"]:
            out.append({"key": f"{c['label']}/seed{s}", "label": c["label"], "seed": s,
                        "config": {**base, "seed": s, "epochs": plan["epochs"]}})
    return out


# -- Tune pieces ---------------------------------------------------------------------------------------


class ConfirmSearcher(Searcher):
    """Hands out the plan's runs, each once: never one already recorded (``done``) or assigned to a
    Tune trial (``assigned``, saved with the Tune state)."""

    def __init__(self, entries: list[dict[str, Any]], done: set[str], metric: str = "val_acc"):
        super().__init__(metric=metric, mode="max")
        self.entries = entries
        self.done = set(done)
        self.assigned: dict[str, str] = {}  # tune trial id -> entry key

    def entry(self, trial_id: str) -> dict[str, Any] | None:
        key = self.assigned.get(trial_id)
        return next((e for e in self.entries if e["key"] == key), None)

    def suggest(self, trial_id: str) -> dict | None:
        if trial_id in self.assigned:
            e = self.entry(trial_id)
            return dict(e["config"]) if e else Searcher.FINISHED
        busy = set(self.assigned.values()) | self.done
        for e in self.entries:
            if e["key"] not in busy:
                self.assigned[trial_id] = e["key"]
                return dict(e["config"])
        return Searcher.FINISHED

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        pass  # recorded by ConfirmRecorder

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "w") as f:
            json.dump({"assigned": self.assigned}, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path) as f:
            self.assigned.update(json.load(f).get("assigned", {}))


class ConfirmRecorder(Callback):
    """Records each confirmation run that reached its last epoch, once, in the Optuna study's user attrs,
    and rewrites the summary (``echo`` prints it)."""

    def __init__(self, study: optuna.Study, searcher: ConfirmSearcher, tracker: Any, plan: dict[str, Any],
                 echo: Callable[[str], None]):
        self.study, self.searcher, self.tracker, self.plan, self.echo = study, searcher, tracker, plan, echo

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        e = self.searcher.entry(trial.trial_id)
        res = getattr(trial, "last_result", None) or {}
        if e is None or epochs_done(res) < self.plan["epochs"]:
            return  # stopped before its last epoch (a cancel): it continues on resume
        rec = self.tracker.record(trial.trial_id) or {}
        record_run(self.study, e["key"], {
            "label": e["label"], "seed": e["seed"], "val_acc": finite(res.get("val_acc")),
            "test_acc": finite(res.get("test_acc")), "epochs": epochs_done(res), "tune_trial_id": trial.trial_id,
            "mlflow_run_id": rec.get("run_id"), "checkpoint_uri": rec.get("checkpoint_uri"),
        }, self.plan)
        self.searcher.done.add(e["key"])
        self.echo(f"confirmation run {e['key']}: val_acc={res.get('val_acc')} test_acc={res.get('test_acc')}")


def record_run(study: optuna.Study, key: str, run: dict[str, Any], plan: dict[str, Any]) -> bool:
    """Add a finished run under ``key`` unless it is there already; rewrite the summary. True if added."""
    runs = dict(study.user_attrs.get(RUNS_ATTR) or {})
    if key in runs:
        return False
    runs[key] = run
    study.set_user_attr(RUNS_ATTR, runs)
    study.set_user_attr(SUMMARY_ATTR, summarize(plan, runs))
    return True


# -- the step ------------------------------------------------------------------------------------------


def search_finished(p: JobPayload, study: optuna.Study | None) -> bool:
    """The search of this study ended (with at least the trials asked for now): go on with confirmation."""
    done = (study.user_attrs.get(SEARCH_DONE_ATTR) if study is not None else None)
    return p.study_spec.confirm is not None and isinstance(done, int) and done >= p.trials_requested


def run_confirmation(driver: Any, study: optuna.Study, echo: Callable[[str], None]) -> dict[str, Any] | None:
    """Train the plan's runs that are not recorded yet; returns the summary (None: the plan is empty).
    A cancel sets ``driver.cancel_requested`` (the Tune state is saved)."""
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler

    from service.sweep.mlflow_callback import MLflowStudyCallback, spool_dir_for, upload_policy
    from service.sweep.searcher import StudySearchGenerator
    from service.sweep.tuner import build_tuner, join_uri

    p = driver.p
    study.set_user_attr(SEARCH_DONE_ATTR, max(int(study.user_attrs.get(SEARCH_DONE_ATTR) or 0), p.trials_requested))
    plan = study.user_attrs.get(PLAN_ATTR)
    if not plan or int(plan.get("num_trials") or 0) < p.trials_requested:
        # first plan, or a resume extended the search: plan again (runs of a configuration and seed
        # recorded before are kept: their keys name the configuration, e.g. ``reference/seed1``)
        plan = make_plan(p, study)
        study.set_user_attr(PLAN_ATTR, plan)
        study.set_user_attr(SUMMARY_ATTR, summarize(plan, {}))
    if not plan["configs"]:
        return None
    entries = plan_entries(p, plan)
    done = set(study.user_attrs.get(RUNS_ATTR) or {})
    echo(f"confirmation: {len(plan['configs'])} configuration(s) x {len(plan['seeds'])} seed(s) "
         f"{plan['seeds']} at {plan['epochs']} epochs; {len(done)} of {len(entries)} run(s) recorded")
    if len(done & {e["key"] for e in entries}) < len(entries):
        searcher = ConfirmSearcher(entries, done)
        limiter = ConcurrencyLimiter(searcher, max_concurrent=int(p.study_spec.budget.max_concurrent_trials))
        generator = StudySearchGenerator(limiter, num_trials=len(entries))
        name = plan["experiment"]
        exp_path = join_uri(p.tune_storage, name)

        def tags(trial_id: str) -> dict[str, str]:
            e = searcher.entry(trial_id) or {}
            return {"confirm.config": e.get("label", ""), "confirm.seed": str(e.get("seed", ""))}

        tracker = MLflowStudyCallback(
            tracking_uri=p.mlflow_tracking_uri, experiment_id=driver.experiment_id,
            parent_run_id=p.parent_run_id, study_id=p.study_id, metric="val_acc", mode="max",
            default_epochs=plan["epochs"], max_t=None, upload=upload_policy(p.study_spec),
            echo=echo, selection="last", stage=STAGE, trial_tags=tags,
            spool_dir=spool_dir_for(exp_path),
        )
        driver.tracker = tracker
        recorder = ConfirmRecorder(study, searcher, tracker, plan, echo)
        tuner = build_tuner(p, exp_path=exp_path, restoring=tune.Tuner.can_restore(exp_path), search_alg=generator,
                            scheduler=FIFOScheduler(), callbacks=[tracker, recorder], num_trials=len(entries),
                            echo=echo, name=name)
        driver._catch_cancel()
        try:
            tuner.fit()
        except KeyboardInterrupt:
            driver.cancel_requested = True
        finally:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if driver.cancel_requested:
            return None
    summary = summarize(plan, dict(study.user_attrs.get(RUNS_ATTR) or {}), final=True)
    study.set_user_attr(SUMMARY_ATTR, summary)
    return summary


def registered_run(summary: dict[str, Any], study: optuna.Study) -> Any | None:
    """The run to register: the confirmed best configuration's run with the highest val_acc, as an
    object ``register_best`` takes (``number``, ``value``, ``values``, ``user_attrs``)."""
    from types import SimpleNamespace

    runs = dict(study.user_attrs.get(RUNS_ATTR) or {})
    best = summary.get("best")
    cands = [(k, r) for k, r in runs.items() if r.get("label") == best and r.get("val_acc") is not None]
    if not cands:
        return None
    key, r = max(cands, key=lambda kr: (kr[1]["val_acc"], -int(kr[1]["seed"])))
    return SimpleNamespace(number=f"confirm:{key}", value=r["val_acc"], values=[r["val_acc"]], user_attrs={
        "mlflow_run_id": r.get("mlflow_run_id"), "checkpoint_uri": r.get("checkpoint_uri"),
        "tune_trial_id": r.get("tune_trial_id"), "best_epoch": r.get("epochs"),
        "tune_experiment": summary.get("experiment"), "test_acc": r.get("test_acc"), "seed": r.get("seed")})


def log_to_parent(driver: Any, summary: dict[str, Any], echo: Callable[[str], None]) -> None:
    """Metrics, tags and the comparison plot on the study's parent run."""
    from service.sweep.confirm_stats import summary_lines

    parent = driver.parent
    for c in summary["configurations"]:
        slug = "reference" if c["role"] == "reference" else f"trial{c['trial']}"
        for m in ("val_acc", "test_acc"):
            if c[m]["mean"] is not None:
                parent.log_metric(f"confirm.{slug}.{m}_mean", float(c[m]["mean"]))
            if c[m]["std"] is not None:
                parent.log_metric(f"confirm.{slug}.{m}_std", float(c[m]["std"]))
    d = summary.get("difference") or {}
    for k in ("diff", "low", "high"):
        if d.get(k) is not None:
            parent.log_metric(f"confirm.best_minus_reference.test_acc_{k}", float(d[k]))
    parent.set_tags({"confirm_best": summary.get("best") or "", "confirmation": json.dumps(d)[:4000]})
    for line in summary_lines(summary):
        echo(line)
    try:
        path = plot_comparison(summary)
        if path and parent.run_id:
            parent._call("log_artifact(confirmation)", parent.client.log_artifact, parent.run_id, path, "confirmation")
            parent._call("log_text(confirmation)", parent.client.log_text, parent.run_id,
                         json.dumps(summary, indent=2), "confirmation/confirmation.json")
    except Exception as exc:  # noqa: BLE001 - a plot must not fail the study
        echo(f"warning: confirmation plot not logged: {type(exc).__name__}: {exc}")


def plot_comparison(summary: dict[str, Any]) -> str | None:
    """A PNG: per configuration its runs' val and test accuracy, mean +- std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    confs = summary["configurations"]
    if not confs:
        return None
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(confs), 3.6))
    for i, c in enumerate(confs):
        for j, (m, color) in enumerate((("val_acc", "tab:blue"), ("test_acc", "tab:orange"))):
            x = i + (j - 0.5) * 0.25
            ys = [r[m] for r in c["runs"] if r.get(m) is not None]
            ax.scatter([x] * len(ys), ys, color=color, s=18, alpha=0.7, label=m if i == 0 else None)
            if c[m]["mean"] is not None:
                ax.errorbar([x], [c[m]["mean"]], yerr=[c[m]["std"] or 0.0], color=color, fmt="_", ms=16, capsize=4)
    ax.set_xticks(range(len(confs)), [c["label"] + ("\n(paper)" if "reference" in c["role"] else "") for c in confs])
    ax.set_ylabel("accuracy")
    d = summary.get("difference") or {}
    title = "confirmation over seeds " + str(summary["seeds"])
    if d.get("diff") is not None:
        title += f"\nbest - reference test_acc {d['diff']:+.4f}"
        if d.get("low") is not None:
            title += f" (95% CI {d['low']:+.4f} .. {d['high']:+.4f})"
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(tempfile.mkdtemp(prefix="bonn-confirm-"), "confirmation.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
