"""The study's searcher: Optuna under Ray Tune, the way a study needs it.

Three small pieces around Ray Tune's ``OptunaSearch`` (ray 2.60, optuna 5):

:class:`StudyOptunaSearch`
    * a trial that ended without error but with fewer epochs than it was configured for (ASHA
      stopped it) is told to Optuna as ``PRUNED`` -- its last value becomes its last intermediate
      value, which is what Optuna's samplers read for pruned trials -- instead of ``COMPLETE`` with a
      partial value (upstream behaviour, which misleads TPE/GP); a completed trial's value is its last
      epoch's, or with ``objective.selection=best`` its best epoch's;
    * an errored trial is ``FAIL``, with user attr ``error`` = one line saying why (from
      ``error_reason(tune_trial_id)``, which the driver wires to Tune's error file of the trial);
      a trial that ends with no (finite) value is ``FAIL``;
    * it writes the per-trial user attributes the API reads (``tune_trial_id``, ``stop_reason``,
      ``epochs_done``, ``last_value``; the MLflow callback adds the rest through
      :meth:`StudyOptunaSearch.set_trial_attrs`) -- always *before* ``tell``, because Optuna refuses
      to change a finished trial;
    * warm-start points are enqueued with ``skip_if_exists`` so a restarted driver never evaluates
      them twice;
    * on restore (``Tuner.restore``) it rebinds to the *current* storage object, keeps the restored
      sampler (its RNG state), and marks Optuna trials that are still ``RUNNING`` but that no Tune
      trial will continue as ``FAIL`` (orphans of a crash); trials that *finished* after the last saved
      Tune state (a driver killed with SIGKILL saves nothing at the end) are counted
      (``finished_unknown``), so that the search generator does not start them again;
    * a trial that errored, was told ``FAIL`` and is then resumed (``resume_errored=True``) and
      finishes gets a *new* Optuna trial with the same parameters (``retry_of`` = the failed one):
      Optuna cannot reopen a finished trial.

:class:`StudyConcurrencyLimiter`
    ``ConcurrencyLimiter`` that forwards completions of trials it does not track (a trial resumed
    after an error) instead of dropping them.

:class:`StudySearchGenerator`
    ``SearchGenerator`` whose number of trials is the *requested* one, also after a restore: Tune
    restores ``total_samples`` from its saved state (``Tuner.restore`` has no ``num_samples``), so a
    resume that extends a study's ``num_trials`` would otherwise be ignored. A restored generator
    that had been ``set_finished()`` (failure limit, time budget) is reopened when trials remain.
    Its count of created trials includes those that finished after the saved state (see above).

Optuna's private storage API is reached only through :func:`trial_storage` and :func:`storage_trial_id`.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable

import optuna
from optuna.trial import TrialState
from ray.tune.search import ConcurrencyLimiter, Searcher
from ray.tune.search.optuna import OptunaSearch
from ray.tune.search.search_generator import SearchGenerator

from service.sweep.stop_reasons import (
    STOP_CANCELLED,
    STOP_COMPLETED,
    STOP_EARLY,
    STOP_ERROR,
    classify_stop,
    epochs_done,
    finite,
    target_epochs,
)

logger = logging.getLogger("bonn_sweep.optuna")

#: Optuna state per stop reason (cancelled: PRUNED when a value exists, else FAIL -- see callers)
STATE_FOR_REASON = {
    STOP_COMPLETED: TrialState.COMPLETE,
    STOP_EARLY: TrialState.PRUNED,
    STOP_ERROR: TrialState.FAIL,
}


def _step(result: dict | None, default: int) -> int:
    """The step Ray's OptunaSearch reports intermediate values at (Tune's training_iteration)."""
    v = (result or {}).get("training_iteration")
    return int(v) if isinstance(v, int) and not isinstance(v, bool) else max(int(default), 1)


# -- Optuna internals (each workaround in one place) --------------------------------------------------


def trial_storage(study: optuna.Study) -> optuna.storages.BaseStorage:
    """The storage behind ``study`` (``study._storage``, private). Optuna 5 has no public way to read a
    trial by its storage id as a FrozenTrial while a ``Trial`` object holds it (to see its stored
    intermediate values / state), nor to set a user attr or the state of a trial that no ``Trial``
    object of this process holds (an orphan of a killed driver, a RUNNING trial at a cancel)."""
    return study._storage


def storage_trial_id(trial: Any) -> int:
    """The storage id of an Optuna ``Trial`` / ``FrozenTrial`` (``_trial_id``, private): Optuna 5 keys
    its storage by it but exposes only ``number``; ``optuna.Trial(study, id)`` re-binds a restored trial."""
    return trial._trial_id


def mark_running_trials(study: optuna.Study, reason: str, keep: Iterable[int] = (), fail: bool = False) -> int:
    """Set ``stop_reason`` = ``reason`` on every RUNNING trial of ``study`` (but those whose storage id
    is in ``keep``) and, with ``fail``, set it FAIL. Returns how many were changed."""
    keep = set(keep)
    storage = trial_storage(study)
    n = 0
    for ft in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        tid = storage_trial_id(ft)
        if tid in keep:
            continue
        try:
            storage.set_trial_user_attr(tid, "stop_reason", reason)
            if fail:
                storage.set_trial_state_values(tid, TrialState.FAIL)
            n += 1
        except Exception as exc:  # noqa: BLE001 - finished meanwhile
            logger.debug("could not mark running trial %s: %s", ft.number, exc)
    return n


class DefineByRun:
    """Picklable define-by-run wrapper: samples with the space, returns its fixed values except the
    keys ``base`` overrides (the trial config is ``{**fixed, **sampled, **base}``; Tune merges what a
    define-by-run function returns *over* the param space, so base keys must not come back here)."""

    def __init__(self, space: Any, drop_keys: Iterable[str] = ()):
        self.space = space
        self.drop_keys = frozenset(drop_keys)

    def __call__(self, trial: Any) -> dict[str, Any] | None:
        fixed = self.space.define_by_run(trial) or {}
        return {k: v for k, v in dict(fixed).items() if k not in self.drop_keys} or None


# -- the searcher ------------------------------------------------------------------------------------


class StudyOptunaSearch(OptunaSearch):
    """``OptunaSearch`` with PRUNED for early-stopped trials, user attrs and restore hygiene."""

    #: attributes that stay those of the live object on restore (not the pickled ones)
    _LIVE_ATTRS = ("_space", "_storage", "_study_name", "_default_epochs", "_max_t", "_echo", "error_reason",
                   "_selection")

    def __init__(
        self,
        space: Callable | dict,
        *,
        metric: str,
        mode: str,
        sampler: optuna.samplers.BaseSampler,
        storage: optuna.storages.BaseStorage,
        study_name: str,
        points_to_evaluate: list[dict] | None = None,
        default_epochs: int = 10,
        max_t: int | None = None,
        echo: Callable[[str], None] | None = None,
        selection: str = "last",
    ):
        self._default_epochs = int(default_epochs)
        #: objective.selection: ``last`` tells Optuna a completed trial's last value, ``best`` its best epoch's
        self._selection = selection
        self._best: dict[str, float] = {}  # tune trial id -> best finite objective value reported
        self._max_t = int(max_t) if max_t else None
        self._target: dict[str, int] = {}  # tune trial id -> epochs that make it complete
        self._retries: dict[str, int] = {}  # tune trial id -> number of the FAIL trial it re-ran
        self._echo = echo
        #: tune trial id -> why it errored (one line), set by the driver; None: no ``error`` attr
        self.error_reason: Callable[[str], str | None] | None = None
        self.finished_unknown = 0  # set by restore()
        # warm starts are enqueued here (skip_if_exists), not by the base class
        super().__init__(
            space=space, metric=metric, mode=mode, sampler=sampler, storage=storage, study_name=study_name
        )
        self.enqueue_points(points_to_evaluate or [])

    # -- public helpers ------------------------------------------------------------------------------
    @property
    def study(self) -> optuna.Study:
        return self._ot_study

    def enqueue_points(self, points: list[dict]) -> int:
        n = 0
        for p in points:
            try:
                before = len(self._ot_study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
                self._ot_study.enqueue_trial(dict(p), skip_if_exists=True)
                after = len(self._ot_study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
                n += int(after > before)
            except Exception as exc:  # noqa: BLE001 - a bad warm start must not kill the study
                logger.warning("could not enqueue warm-start point %s: %s", p, exc)
        return n

    def optuna_trial(self, tune_trial_id: str) -> optuna.Trial | None:
        return self._ot_trials.get(tune_trial_id)

    def trial_number(self, tune_trial_id: str) -> int | None:
        t = self._ot_trials.get(tune_trial_id)
        return t.number if t is not None else None

    def set_trial_attrs(self, tune_trial_id: str, attrs: dict[str, Any]) -> bool:
        """Write user attrs on the trial's Optuna trial while it is still running (else a no-op)."""
        t = self._ot_trials.get(tune_trial_id)
        if t is None or tune_trial_id in self._completed_trials:
            return False
        ok = True
        for k, v in attrs.items():
            try:
                t.set_user_attr(k, v)
            except Exception as exc:  # noqa: BLE001 - finished trial, storage hiccup
                ok = False
                logger.debug("set_user_attr(%s) on trial %s failed: %s", k, t.number, exc)
        return ok

    # -- Searcher API --------------------------------------------------------------------------------
    def suggest(self, trial_id: str) -> dict | None:
        params = super().suggest(trial_id)
        if params is None or params == Searcher.FINISHED:
            return params
        self._target[trial_id] = target_epochs(params.get("epochs"), self._default_epochs, self._max_t)
        self.set_trial_attrs(trial_id, {"tune_trial_id": trial_id})
        return params

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id not in self._ot_trials or trial_id in self._completed_trials:
            return  # e.g. a trial resumed after a restore without searcher state
        v = finite(result.get(self._metric)) if isinstance(self._metric, str) else None
        best = self.__dict__.setdefault("_best", {}).get(trial_id)
        if v is not None and (best is None or (v > best if self._mode == "max" else v < best)):
            self._best[trial_id] = v
        try:
            super().on_trial_result(trial_id, result)
        except Exception as exc:  # noqa: BLE001 - NaN metric, storage hiccup
            logger.debug("report for %s failed: %s", trial_id, exc)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is None:
            logger.warning("completion of unknown trial %s ignored (no Optuna trial)", trial_id)
            return
        if trial_id in self._completed_trials:
            # finished before (e.g. FAIL), resumed with resume_errored=True, finished again
            self._record_retry(trial_id, result, error)
            return
        state, value, reason, epochs = self.decide(trial_id, result, error)
        attrs: dict[str, Any] = {"stop_reason": reason, "epochs_done": epochs}
        if value is not None:
            attrs["last_value"] = value
        if error and self.error_reason is not None:
            try:
                why = self.error_reason(trial_id)
            except Exception as exc:  # noqa: BLE001 - an unreadable error file must not stop the tell
                why = None
                logger.debug("no error reason for %s: %s", trial_id, exc)
            if why:
                attrs["error"] = why
        self.set_trial_attrs(trial_id, attrs)
        self._tell(ot_trial, state, value, _step(result, epochs))
        self._completed_trials.add(trial_id)

    def decide(self, trial_id: str, result: dict | None, error: bool) -> tuple[TrialState, float | None, str, int]:
        """(Optuna state, value, stop_reason, epochs done) for a trial that ended with ``result``."""
        value = self._value(result)
        epochs = epochs_done(result)
        target = self._target.get(trial_id, target_epochs(None, self._default_epochs, self._max_t))
        if error:
            return TrialState.FAIL, value, STOP_ERROR, epochs
        if value is None:
            # ended without a usable value: stopped before its first report, or NaN/inf
            reason = STOP_CANCELLED if epochs == 0 else STOP_ERROR
            return TrialState.FAIL, None, reason, epochs
        reason = classify_stop(epochs, target)
        if reason == STOP_COMPLETED and getattr(self, "_selection", "last") == "best":
            best = self.__dict__.get("_best", {}).get(trial_id)
            if best is not None and (best > value if self._mode == "max" else best < value):
                value = best  # objective.selection=best: the best epoch's value, like the checkpoint registered
        return STATE_FOR_REASON[reason], value, reason, epochs

    def finalize(self, trial_id: str, result: dict | None, reason: str = STOP_CANCELLED) -> bool:
        """Close a trial Tune will not complete (stopped at the end of a run): PRUNED with its last
        value if it has one, else FAIL. Returns True if something was told."""
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is None or trial_id in self._completed_trials:
            return False
        value = self._value(result)
        epochs = epochs_done(result)
        attrs: dict[str, Any] = {"stop_reason": reason, "epochs_done": epochs}
        if value is not None:
            attrs["last_value"] = value
        self.set_trial_attrs(trial_id, attrs)
        self._tell(ot_trial, TrialState.PRUNED if value is not None else TrialState.FAIL, value, _step(result, epochs))
        self._completed_trials.add(trial_id)
        return True

    def _value(self, result: dict | None) -> Any:
        """The trial's objective value: a float, or for a multi-objective study (``metric`` a list) the
        list of its values (None when one is missing or not finite)."""
        if isinstance(self._metric, str):
            return finite((result or {}).get(self._metric))
        values = [finite((result or {}).get(m)) for m in self._metric or []]
        return values if values and all(v is not None for v in values) else None

    def _tell(self, ot_trial: optuna.Trial, state: TrialState, value: Any, step: int) -> None:
        try:
            if state == TrialState.PRUNED:
                # Optuna takes a pruned trial's value from its last intermediate value; Tune did not
                # report the result on which the scheduler stopped the trial, so report it here
                # (single objective only: Optuna keeps no intermediate values of multi-objective trials).
                frozen = trial_storage(self._ot_study).get_trial(storage_trial_id(ot_trial))
                if value is not None and not isinstance(value, list) and step not in frozen.intermediate_values:
                    ot_trial.report(value, step)
                self._ot_study.tell(ot_trial, state=TrialState.PRUNED)
            elif state == TrialState.COMPLETE:
                self._ot_study.tell(ot_trial, value, state=TrialState.COMPLETE)
            else:
                self._ot_study.tell(ot_trial, state=TrialState.FAIL)
        except RuntimeError as exc:
            # GridSampler.after_trial calls study.stop() once the grid is exhausted, which raises
            # outside study.optimize(); the state has been stored already (tell's `finally`).
            logger.debug("tell(%s) raised after storing the state: %s", ot_trial.number, exc)
        except Exception as exc:  # noqa: BLE001
            logger.warning("could not tell Optuna trial %s (%s): %s", ot_trial.number, state.name, exc)

    def _record_retry(self, trial_id: str, result: dict | None, error: bool) -> None:
        old = self._ot_trials[trial_id]
        try:
            frozen = trial_storage(self._ot_study).get_trial(storage_trial_id(old))
        except Exception:  # noqa: BLE001
            return
        if frozen.state != TrialState.FAIL or self._retries.get(trial_id) == frozen.number:
            return
        state, value, reason, epochs = self.decide(trial_id, result, error)
        if state == TrialState.FAIL:
            return
        attrs = {**frozen.user_attrs, "stop_reason": reason, "epochs_done": epochs, "retry_of": frozen.number}
        if value is not None:
            attrs["last_value"] = value
        try:
            new = optuna.trial.create_trial(
                params=frozen.params,
                distributions=frozen.distributions,
                **({"values": value} if isinstance(value, list) and state == TrialState.COMPLETE else
                   {"value": value if state == TrialState.COMPLETE and not isinstance(value, list) else None}),
                state=state if state == TrialState.COMPLETE else TrialState.PRUNED,
                intermediate_values={epochs or 1: value}
                if state != TrialState.COMPLETE and not isinstance(value, list) else None,
                user_attrs=attrs,
            )
            self._ot_study.add_trial(new)
            self._retries[trial_id] = frozen.number
            logger.info("trial %s re-ran after FAIL #%s: recorded as a new Optuna trial", trial_id, frozen.number)
        except Exception as exc:  # noqa: BLE001
            logger.warning("could not record the re-run of %s: %s", trial_id, exc)

    # -- restore -------------------------------------------------------------------------------------
    def save(self, checkpoint_path: str) -> None:
        state = self.__dict__.copy()
        state.pop("_echo", None)  # a print function of this process
        state.pop("error_reason", None)  # a lookup into this process's Tune trials
        import pickle

        with open(checkpoint_path, "wb") as f:
            pickle.dump(state, f)

    def restore(self, checkpoint_path: str) -> None:
        live = {k: self.__dict__[k] for k in self._LIVE_ATTRS if k in self.__dict__}
        super().restore(checkpoint_path)
        old_trials = dict(self._ot_trials)
        self.__dict__.update(live)
        self.__dict__.setdefault("_target", {})
        self.__dict__.setdefault("_retries", {})
        self.__dict__.setdefault("_best", {})
        self.__dict__.setdefault("error_reason", None)
        # the pickled study/storage point at the URL of the run that saved them; use the live storage
        self._ot_study = optuna.load_study(
            study_name=self._study_name,
            storage=self._storage,
            sampler=self._sampler,
            pruner=optuna.pruners.NopPruner(),
        )
        self._ot_trials = {}
        for tid, t in old_trials.items():
            try:
                self._ot_trials[tid] = optuna.Trial(self._ot_study, storage_trial_id(t))
            except Exception as exc:  # noqa: BLE001 - a trial deleted from the storage
                logger.warning("restored trial %s has no Optuna trial %s: %s", tid, storage_trial_id(t), exc)
        self.finished_unknown = self._count_finished_unknown()
        n = self.fail_orphans()
        msg = (
            f"searcher restored: {len(self._ot_trials)} Optuna trials known, "
            f"{len(self._completed_trials)} finished, {n} orphaned RUNNING trial(s) marked FAIL"
            + (f", {self.finished_unknown} finished after the saved state" if self.finished_unknown else "")
        )
        logger.info(msg)
        if self._echo:
            self._echo(msg)

    def _count_finished_unknown(self) -> int:
        """Optuna trials of this study that no restored Tune trial maps to but that finished: started
        and ended after the last saved Tune state (the driver was then killed). Excluded: orphans
        failed on an earlier restore (``stop_reason=cancelled``) and re-runs (``retry_of``)."""
        known = {storage_trial_id(t) for t in self._ot_trials.values()}
        n = 0
        for ft in self._ot_study.get_trials(deepcopy=False):
            if storage_trial_id(ft) in known or "retry_of" in ft.user_attrs:
                continue
            if ft.state in (TrialState.COMPLETE, TrialState.PRUNED) or (
                ft.state == TrialState.FAIL and ft.user_attrs.get("stop_reason") != STOP_CANCELLED
            ):
                n += 1
        return n

    @property
    def trials_accounted(self) -> int:
        """Trials of this study a search generator has created: those Tune knows plus those that
        finished after the saved state (after a restore)."""
        return len(self._ot_trials) + self.finished_unknown

    def fail_orphans(self) -> int:
        """Mark RUNNING Optuna trials that no unfinished Tune trial maps to as FAIL."""
        active = {storage_trial_id(t) for tid, t in self._ot_trials.items() if tid not in self._completed_trials}
        return fail_running_trials(self._ot_study, keep=active)


def fail_running_trials(study: optuna.Study, keep: Iterable[int] = (), reason: str = STOP_CANCELLED) -> int:
    """Set every RUNNING trial of ``study`` (but those whose storage id is in ``keep``) to FAIL."""
    return mark_running_trials(study, reason, keep=keep, fail=True)


# -- Tune wrappers -----------------------------------------------------------------------------------


class StudyConcurrencyLimiter(ConcurrencyLimiter):
    """Forwards completions of untracked trials (resumed after an error) to the searcher."""

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if self._limit_concurrency and trial_id not in self.live_trials and not self.batch:
            self.searcher.on_trial_complete(trial_id, result=result, error=error)
            return
        super().on_trial_complete(trial_id, result=result, error=error)


class StudySearchGenerator(SearchGenerator):
    """SearchGenerator whose total number of trials is ``num_trials``, also after ``Tuner.restore``."""

    def __init__(self, searcher: Searcher, num_trials: int):
        super().__init__(searcher)
        self.num_trials = int(num_trials)

    def add_configurations(self, experiments: Any) -> None:
        super().add_configurations(experiments)
        self._total_samples = self.num_trials  # Tuner.restore() builds its Experiment with num_samples=1

    def set_state(self, state: dict) -> None:
        super().set_state(state)  # (SearchGenerator.restore_from_dir restores the base searcher first)
        accounted = getattr(self.base_searcher, "trials_accounted", 0)
        if accounted > self._counter:
            logger.info("created trials %s -> %s on restore (trials that finished after the saved state)",
                        self._counter, accounted)
            self._counter = accounted
        restored_total = self._total_samples
        self._total_samples = self.num_trials
        if self._finished and self._counter < self._total_samples:
            self._finished = False  # stopped early before (failure limit, time budget): resume goes on
        if restored_total != self._total_samples:
            logger.info("num_trials %s -> %s on restore (%s created so far)", restored_total, self._total_samples,
                        self._counter)

    @property
    def created(self) -> int:
        return self._counter

    @property
    def base_searcher(self) -> Searcher:
        s = self.searcher
        while hasattr(s, "searcher"):
            s = s.searcher
        return s
