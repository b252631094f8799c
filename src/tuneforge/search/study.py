"""Hyperparameter studies on Optuna: door checks, storage, the trial budget shared by workers, one trial.

Every trial is an ordinary run (``run_training``) in ``<study_dir>/trial-<n>``, scored on the eval split. The
study lives in an Optuna RDB storage: a SQLite file in the study folder by default, or any SQLAlchemy URL
(``postgresql://...``) that several ``tuneforge search`` processes share.

The trial budget (``--trials N``) counts the study's trials, not one process's: each worker asks for a trial,
and a trial whose position among the study's valid trials is N or more is discarded before it trains (recorded
as failed with the attribute ``discarded``), so concurrent workers together run exactly N. Optuna numbers trials
under a row lock, so positions never collide. A trial whose worker died is marked failed and its parameters are
queued again (``retry_of``), by that worker itself on Ctrl-C/SIGTERM, by ``--resume`` on the same machine when the
process is gone, or by any worker once its heartbeat is stale; the failed original no longer counts.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import re
import socket
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneforge.config import RunConfig, validate_config
from tuneforge.config.load import read_yaml
from tuneforge.console import say, silenced
from tuneforge.errors import UserError, did_you_mean
from tuneforge.search.space import Space, dump_values, load_space

SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("median", "halving", "none")
TRAINER_OBJECTIVE = "eval_loss"  # reported by every run with eval data; the others are tuneforge eval's metrics
GPU_MARGIN = 0.10  # the estimator's default safety margin (tuneforge estimate --margin)
HEARTBEAT_S = 20
GRACE_S = 120

# trial user attributes
RETRY_OF, RETRY_REASON, DISCARDED = "retry_of", "retry_reason", "discarded"
FAIL_REASON, PRUNE_REASON, WORKER = "fail_reason", "prune_reason", "worker"
META = "tuneforge"  # study user attribute: what the study was started with


@dataclass
class SearchOptions:
    """What ``tuneforge search`` was asked to do (the CLI's flags)."""

    config: str
    space: str
    trials: int | None = None
    sampler: str = "tpe"
    objective: str = "eval_loss"
    direction: str | None = None
    timeout: float | None = None
    storage: str | None = field(default=None, repr=False)  # may hold a password
    study: str | None = None
    pruner: str = "median"
    pruner_startup: int = 2
    resume: bool = False
    gpu_mem: float | None = None
    out: str | None = None
    max_new_tokens: int = 32


@dataclass
class Search:
    """A checked search: everything the trials need, built before any trial starts."""

    options: SearchOptions
    base_raw: dict
    base: RunConfig
    space: Space
    objective: str
    direction: str
    trials: int | None
    study_name: str
    study_dir: Path
    storage_url: str = field(repr=False)  # may hold a password: print redact(storage_url)
    eval_records: list[dict] | None = None
    notes: list[str] = field(default_factory=list)
    _specs: dict = field(default_factory=dict, repr=False)

    @property
    def prunes(self) -> bool:
        """Intermediate evals are reported (and trials may be pruned): eval_loss objective and a pruner."""
        return self.objective == TRAINER_OBJECTIVE and self.options.pruner != "none"


# --------------------------------------------------------------------------- door checks


def prepare(options: SearchOptions) -> Search:
    """Check every input (config, space, objective, sampler, budget, storage) without starting a trial.

    Raises:
        UserError: naming the file, key or flag and the fix.
    """
    _require_optuna()
    base_raw = read_yaml(options.config)
    base = validate_config(base_raw, source=str(options.config))
    if base.data.eval is None and base.data.eval_split is None:
        raise UserError(f"{options.config}: a search scores every trial on held-out data, and this config has none; "
                        "set data.eval (a file) or data.eval_split (e.g. 0.1) — never the training data")
    # Trials start from the resolved config (every section and default written out): a space key such as
    # method.r then lands in a complete method section even when the file leaves the method to its default.
    base_raw = base.model_dump(mode="json")
    space = load_space(options.space, base_raw)
    if not space.sampled:
        raise UserError(f"{options.space}: nothing to search (only ties); add a choice, uniform, log_uniform or int")
    objective, higher_is_better = _objective(options.objective)
    direction = options.direction or ("maximize" if higher_is_better else "minimize")
    if direction not in ("minimize", "maximize"):
        raise UserError(f"--direction {direction!r}: expected minimize or maximize")
    if options.sampler not in SAMPLERS:
        raise UserError(f"--sampler {options.sampler!r}{did_you_mean(options.sampler, SAMPLERS)}; "
                        f"known: {', '.join(SAMPLERS)}")
    if options.pruner not in PRUNERS:
        raise UserError(f"--pruner {options.pruner!r}{did_you_mean(options.pruner, PRUNERS)}; "
                        f"known: {', '.join(PRUNERS)}")
    notes: list[str] = []
    trials = _trial_budget(options, space, notes)
    if options.timeout is not None and options.timeout <= 0:
        raise UserError(f"--timeout {options.timeout}: expected seconds > 0")
    if options.pruner_startup < 0:
        raise UserError(f"--pruner-startup {options.pruner_startup}: expected a count >= 0")
    if options.pruner != "none":
        if objective != TRAINER_OBJECTIVE:
            notes.append(f"objective {objective} is measured once per finished trial: no pruning (--pruner ignored)")
        elif not base.train.eval_steps:
            raise UserError(f"{options.config}: pruning compares intermediate evals, and train.eval_steps is not set; "
                            "set train.eval_steps (e.g. a quarter of the steps) or pass --pruner none")
    records = _objective_records(base, objective, options)
    if options.gpu_mem is not None:
        if options.gpu_mem <= 0:
            raise UserError(f"--gpu-mem {options.gpu_mem}: expected GiB > 0")
        from tuneforge.estimate import setup_from_run

        setup_from_run(base, device="cuda")  # a method the estimator cannot price fails here, at the door
    name = options.study or f"{base.run_name}-search"
    if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise UserError(f"--study {name!r}: use letters, digits, '-', '_' and '.' (it names a folder)")
    study_dir = Path(options.out) if options.out else Path(base.output_dir).parent / name
    url = storage_url(options.storage) or f"sqlite:///{(study_dir / 'study.db').resolve()}"
    return Search(options=options, base_raw=base_raw, base=base, space=space, objective=objective,
                  direction=direction, trials=trials, study_name=name, study_dir=study_dir, storage_url=url,
                  eval_records=records, notes=notes)


def _require_optuna() -> None:
    try:
        import optuna  # noqa: F401
    except ImportError:
        raise UserError("tuneforge search needs Optuna: pip install 'tuneforge[search]' "
                        "(optuna; psycopg2-binary for PostgreSQL storages)") from None


def objectives() -> dict[str, bool]:
    """Every objective a search may optimise with its direction (``name -> higher is better``): the Trainer's
    ``eval_loss``, then every metric of ``tuneforge eval``'s registry (``tuneforge.evaluate.metrics.METRICS``) —
    a newly registered metric is an objective without any change here."""
    from tuneforge.evaluate.metrics import METRICS

    return {TRAINER_OBJECTIVE: False, **{name: metric.higher_is_better for name, metric in METRICS.items()}}


def _objective(name: str) -> tuple[str, bool]:
    """``(objective name, higher is better)`` for ``--objective name``: an :func:`objectives` name, ``loss``, or an
    alias of one registered metric (``perplexity``, ``em``)."""
    from tuneforge.evaluate.metrics import METRICS, aliases

    known = objectives()
    groups = {alias: names[0] for alias, names in aliases().items() if len(names) == 1}
    resolved = TRAINER_OBJECTIVE if name == "loss" else groups.get(name, name)
    if resolved not in known:
        raise UserError(f"--objective {name!r} is not reported by a run{did_you_mean(name, [*known, *groups])}; "
                        f"known: {TRAINER_OBJECTIVE} (the Trainer's loss on the eval split), "
                        f"{', '.join(METRICS)} (tuneforge eval's metrics, computed on data.eval)")
    return resolved, known[resolved]


def _trial_budget(options: SearchOptions, space: Space, notes: list[str]) -> int | None:
    trials = options.trials
    if trials is not None and trials <= 0:
        raise UserError(f"--trials {trials}: expected a positive number of trials")
    if options.sampler == "grid":
        size = space.grid_size()
        if trials is None or trials > size:
            if trials is not None:
                notes.append(f"--trials {trials} > {size} grid points: the grid is run once ({size} trials)")
            trials = size
    elif trials is None and options.timeout is None:
        raise UserError(f"--sampler {options.sampler} needs --trials N (or --timeout S) to know when to stop")
    return trials


def _objective_records(base: RunConfig, objective: str, options: SearchOptions) -> list[dict] | None:
    """The eval records a generation metric (or ppl) is computed on; eval_loss needs none."""
    if objective == TRAINER_OBJECTIVE:
        return None
    if base.data.eval is None:
        raise UserError(f"{options.config}: objective {objective} is computed on the eval file's records, and the "
                        "config has data.eval_split instead; set data.eval to a file or use --objective eval_loss")
    from tuneforge.evaluate.runner import check_records, load_eval_records

    paths = [base.data.eval] if isinstance(base.data.eval, str) else list(base.data.eval)
    records = [r for path in paths for r in load_eval_records(path, base.data.format)]
    check_records(records, [objective], ", ".join(paths))  # before any trial trains
    return records


# --------------------------------------------------------------------------- storage and study


_URL_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"]+")
# key=value secrets: URL query parameters (?password=, &sslpassword=) and libpq-style "password=..." in messages
_SECRET_RE = re.compile(r"(?i)\b([a-z_]*(?:password|passwd|pwd|secret|token|api_?key)\s*=\s*)('[^']*'|\"[^\"]*\"|[^\s&;,'\"]+)")


def redact(text: str) -> str:
    """``text`` (a storage URL, or a message that may quote one) with every secret replaced by ``***``: the password
    of ``dialect://user:password@host`` and the value of any ``password=`` / ``secret=`` / ``token=`` parameter."""
    return _SECRET_RE.sub(r"\1***", _URL_RE.sub(lambda m: _redact_userinfo(m.group(0)), str(text)))


def _redact_userinfo(url: str) -> str:
    scheme, _, rest = url.partition("://")
    main, query_mark, query = rest.partition("?")
    creds, at, host = main.rpartition("@")  # the last '@' before the query: a password may contain '@'
    if not at or ":" not in creds:
        return url
    return f"{scheme}://{creds.split(':', 1)[0]}:***@{host}{query_mark}{query}"


def storage_url(value: str | None) -> str | None:
    """``--storage``'s URL: as given, or ``env:NAME`` — the URL in the environment variable ``NAME`` (so that a
    password never appears on the command line, where ``ps`` and shell histories show it).

    Raises:
        UserError: ``env:NAME`` with ``NAME`` unset or empty.
    """
    if value is None or not value.startswith("env:"):
        return value
    name = value.removeprefix("env:")
    url = os.environ.get(name, "").strip()
    if not url:
        raise UserError(f"--storage {value}: the environment variable {name} is not set (or empty); export the "
                        f"storage URL in it, e.g. {name}=postgresql://user:password@host/db")
    return url


def open_storage(url: str):
    """An Optuna RDB storage with heartbeats (stale trials of dead workers are failed and queued again).

    Raises:
        UserError: the URL is malformed, its driver is missing, or the database cannot be reached.
    """
    import optuna
    from optuna.storages import RDBStorage

    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs["connect_args"] = {"timeout": 60}  # concurrent local workers wait for the file lock
    elif url.startswith(("postgresql", "postgres")):
        engine_kwargs["connect_args"] = {"connect_timeout": 10}
    for attempt in range(CREATE_ATTEMPTS):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats: stable enough
                return RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_S,
                                  grace_period=GRACE_S, heartbeat_stale_trial_callback=_requeue_stale)
        except ImportError as exc:
            raise UserError(f"--storage {redact(url)}: the database driver is not installed ({exc}); for "
                            "PostgreSQL: pip install 'tuneforge[search]' (psycopg)") from None
        except Exception as exc:  # sqlalchemy's OperationalError / ArgumentError, optuna's StorageInternalError
            # Workers started together on an empty database race to create Optuna's tables; the loser sees
            # "already exists" / "duplicate key" and finds the tables there when it tries again.
            if attempt + 1 < CREATE_ATTEMPTS and _creation_race(exc):
                time.sleep(0.5 + random.random())
                continue
            detail = redact(str(getattr(exc, "orig", None) or exc)).strip().splitlines()
            raise UserError(f"--storage {redact(url)}: cannot open the study storage: "
                            f"{detail[0] if detail else type(exc).__name__}\ncheck the URL (dialect://user:password@host:port/"
                            "database), that the server runs and accepts this user") from None
    raise AssertionError("unreachable")


CREATE_ATTEMPTS = 5


def _creation_race(exc: BaseException) -> bool:
    text = f"{exc} {getattr(exc, 'orig', '')}".lower()
    return "already exists" in text or "duplicate key" in text


def _fingerprint(search: Search) -> str:
    meta = {"config": search.base_raw, "space": [p.describe() + p.key for p in search.space.params],
            "objective": search.objective, "sampler": search.options.sampler}
    return hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode()).hexdigest()[:16]


def open_study(search: Search, storage):
    """Create the study, or with ``--resume`` join/continue it (same config, space, objective and sampler).

    Returns:
        (study, created): ``created`` is True for the process that created it.
    """
    import optuna

    opts = search.options
    meta = {"fingerprint": _fingerprint(search), "objective": search.objective, "sampler": opts.sampler,
            "config": str(opts.config), "space": str(opts.space)}
    try:
        study = optuna.create_study(storage=storage, study_name=search.study_name, direction=search.direction)
        study.set_user_attr(META, meta)
        return study, True
    except optuna.exceptions.DuplicatedStudyError:
        pass
    study = optuna.load_study(study_name=search.study_name, storage=storage)
    if not opts.resume:
        raise UserError(f"study '{search.study_name}' already exists in {redact(search.storage_url)} "
                        f"({len(study.trials)} trials); pass --resume to continue it or to add this worker, "
                        "or choose another --study")
    if study.direction.name.lower() != search.direction:
        raise UserError(f"study '{search.study_name}' was started to {study.direction.name.lower()} its objective, "
                        f"not {search.direction}; drop --direction or choose another --study")
    stored = _wait_for_meta(study)
    if stored and stored.get("fingerprint") != meta["fingerprint"]:
        raise UserError(f"study '{search.study_name}' was started with another run config, space, objective or "
                        f"sampler ({stored.get('config')}, {stored.get('space')}, {stored.get('objective')}, "
                        f"{stored.get('sampler')}); resume it with the same files and flags, or choose another --study")
    return study, False


def _wait_for_meta(study, seconds: float = 10.0) -> dict | None:
    """The creator writes the study's meta right after creating it; a worker started at the same moment waits."""
    deadline = time.time() + seconds
    while True:
        meta = study.user_attrs.get(META)
        if meta or time.time() > deadline:
            return meta
        time.sleep(0.2)


def make_sampler(search: Search, created: bool):
    """The Optuna sampler. Seeded by the run's seed for the process that created the study (reproducible); a
    joining worker mixes in its process id so that two workers never draw the same random sequence."""
    import optuna

    seed = search.base.seed if created else search.base.seed + os.getpid()
    if search.options.sampler == "grid":
        # Optuna assigns grid point k to trial number k (numbers are unique), so workers never share a point;
        # the point order is shuffled by the seed, which must therefore be the same in every worker.
        return optuna.samplers.GridSampler(search.space.grid(), seed=search.base.seed)
    if search.options.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # Optuna's TPE samples its first 10 trials at random; with a budget of a dozen trials that would leave it
    # almost nothing to model, so small budgets start modelling after a third of their trials (at least 3).
    startup = 10 if search.trials is None else max(3, min(10, search.trials // 3))
    return optuna.samplers.TPESampler(seed=seed, constant_liar=True, n_startup_trials=startup)


def make_pruner(search: Search):
    import optuna

    if not search.prunes:
        return optuna.pruners.NopPruner()
    if search.options.pruner == "halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=search.options.pruner_startup)


# --------------------------------------------------------------------------- budget and retries


def worker_id() -> str:
    """``host:pid:start`` of this process (the start time tells a reused pid apart)."""
    return f"{socket.gethostname()}:{os.getpid()}:{_start_ticks(os.getpid())}"


def _start_ticks(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return "?"


def _worker_alive(worker: str) -> bool | None:
    """True/False for a worker of this machine, None for another machine's (only its heartbeat can tell)."""
    try:
        host, pid, ticks = worker.rsplit(":", 2)
    except ValueError:
        return None
    if host != socket.gethostname():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return ticks == "?" or _start_ticks(int(pid)) == ticks


def accounting(trials) -> tuple[set[int], set[int]]:
    """(superseded, discarded) trial numbers: neither counts towards the budget."""
    superseded = {t.user_attrs[RETRY_OF] for t in trials if RETRY_OF in t.user_attrs}
    discarded = {t.number for t in trials if t.user_attrs.get(DISCARDED)}
    return superseded, discarded


def counted(trials, *, include_waiting: bool) -> list:
    """Trials that count towards the budget: not discarded, not superseded by a retry."""
    from optuna.trial import TrialState

    superseded, discarded = accounting(trials)
    return [t for t in trials if t.number not in superseded and t.number not in discarded
            and (include_waiting or t.state != TrialState.WAITING)]


def requeue(study, trial, reason: str) -> None:
    """Queue ``trial``'s parameters again as a new trial that supersedes it."""
    study.enqueue_trial(dict(trial.params), user_attrs={RETRY_OF: trial.number, RETRY_REASON: reason})


def _requeue_stale(study, trial) -> None:
    """Optuna's callback for a trial whose worker stopped sending heartbeats (it is already marked failed)."""
    requeue(study, trial, f"worker {trial.user_attrs.get(WORKER, '?')} stopped sending heartbeats")


def recover_dead_local_trials(study) -> list[int]:
    """Fail and re-queue running trials whose worker process on this machine is gone (killed search).

    Marking a trial failed is atomic in the storage, so when two resuming workers find the same trial only one
    re-queues it.
    """
    from optuna.trial import TrialState

    recovered = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get(WORKER)
        if not worker or _worker_alive(worker) is not False:
            continue
        try:
            study.tell(trial.number, state=TrialState.FAIL)
        except (ValueError, RuntimeError):  # another worker got there first
            continue
        pid = worker.rsplit(":", 2)[1]
        requeue(study, trial, f"interrupted: its worker (pid {pid}) ended without finishing it")
        recovered.append(trial.number)
    if recovered:
        say(f"resume: trials {', '.join(map(str, recovered))} were interrupted; their parameters are queued again")
    return recovered


# --------------------------------------------------------------------------- the loop


class TrialFailed(Exception):
    """A trial failed for a recorded reason (the study goes on)."""


class TrialDiscarded(Exception):
    """The budget was already full when this trial was numbered (a concurrent worker took the last slot)."""


class SearchInterrupted(UserError):
    """Ctrl-C or SIGTERM stopped this worker: its running trial was queued again (it does not count towards the
    budget) and no further trial was started. Exit code 130 (SIGINT) or 143 (SIGTERM)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class SearchResult:
    """What one worker's ``run_search`` did, and where the study's files are."""

    study: Any
    study_dir: Path
    ran: list[int]
    notes: list[str]


def run_search(search: Search, train_log: bool = False) -> SearchResult:
    """Run trials until the study has ``search.trials`` (or ``--timeout`` passes), then return.

    Args:
        search: from :func:`prepare`.
        train_log: show each trial's training lines too (default: only this worker's progress lines, through
            :func:`tuneforge.console.say`).
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # our own lines say what happened, once
    storage = open_storage(search.storage_url)  # before anything is written: a bad URL leaves no trace
    study, created = open_study(search, storage)
    search.study_dir.mkdir(parents=True, exist_ok=True)
    if created and any(search.study_dir.glob("trial-*")):
        raise UserError(f"{search.study_dir} holds trial directories of an earlier search under this name; "
                        f"remove them or choose another --study (or --out)")
    study.sampler = make_sampler(search, created)
    study.pruner = make_pruner(search)
    for note in search.notes:
        say(f"note: {note}")
    if not created:
        recover_dead_local_trials(study)
    me = worker_id()
    say(f"study '{search.study_name}' ({'new' if created else 'resumed'}) in {redact(search.storage_url)}; "
         f"{search.options.sampler} sampler, {search.direction} {search.objective}, "
         f"budget {search.trials if search.trials is not None else 'unbounded'} trials")
    started = time.time()
    ran: list[int] = []
    while True:
        trials = study.get_trials(deepcopy=False)
        done = len(counted(trials, include_waiting=False))
        if search.trials is not None and done >= search.trials:
            break
        if search.options.timeout is not None and time.time() - started >= search.options.timeout:
            say(f"--timeout {search.options.timeout:g}s reached: no new trial started")
            break
        numbers = []

        def objective(trial, numbers=numbers):
            numbers.append(trial.number)
            return run_trial(search, study, trial, me, train_log)

        study.optimize(objective, n_trials=1, catch=(TrialFailed, TrialDiscarded))
        if numbers and not study.trials[numbers[0]].user_attrs.get(DISCARDED):
            ran.append(numbers[0])
    return SearchResult(study=study, study_dir=search.study_dir, ran=ran, notes=search.notes)


def _slot(study, number: int) -> int:
    """How many counted trials come before trial ``number`` (its position in the budget)."""
    trials = study.get_trials(deepcopy=False)
    return len([t for t in counted(trials, include_waiting=True) if t.number < number])


def run_trial(search: Search, study, trial, me: str, train_log: bool = False) -> float:
    """One trial: sample, tie, validate, check memory, train in ``trial-<n>``, score on the eval split.

    Raises:
        optuna.TrialPruned: pruned by an intermediate eval or by the memory estimate.
        TrialFailed: anything else that went wrong (the reason is in the trial's ``fail_reason``).
        TrialDiscarded: the budget was full when this trial was numbered.
        SearchInterrupted: Ctrl-C or SIGTERM, after queueing the trial's parameters again (the worker stops).
    """
    import optuna

    from tuneforge.train.run import TrainingInterrupted
    from tuneforge.utils import Terminated

    if search.trials is not None and _slot(study, trial.number) >= search.trials:
        trial.set_user_attr(DISCARDED, "the budget was full when this trial was numbered")
        raise TrialDiscarded(f"trial {trial.number}: budget of {search.trials} already taken")
    trial.set_user_attr(WORKER, me)
    label = f"trial {trial.number}"
    try:
        values = search.space.resolve(search.space.sample(trial), search.base)
        ties = {p.key: values[p.key] for p in search.space.ties}
        if ties:
            trial.set_user_attr("ties", ties)
        say(f"{label}: {dump_values(values)}")
        cfg = trial_config(search, trial.number, values)
        _check_memory(search, cfg, trial)
        result, callback = _train(search, cfg, trial, train_log)
        _record_run(trial, result, callback)
        if callback.pruned_at is not None:
            reason = f"pruned at step {callback.pruned_at}: eval_loss {callback.evals[-1][1]:.4f}"
            trial.set_user_attr(PRUNE_REASON, reason)
            say(f"{label}: {reason}")
            raise optuna.TrialPruned(reason)
        value = _score(search, result, callback)
    except optuna.TrialPruned:
        raise
    except (KeyboardInterrupt, Terminated, TrainingInterrupted) as exc:
        # Ctrl-C, or SIGTERM: during training the run's own handler saves a checkpoint and raises
        # TrainingInterrupted (a UserError, which the clause below would record as an ordinary failure that counts,
        # and the loop would start the next trial); elsewhere search's or the run's handler raises Terminated. Optuna marks the trial failed; its parameters are queued again (the retry supersedes it, so it
        # does not count) and this worker stops.
        requeue(study, trial, "interrupted (Ctrl-C / SIGTERM)")
        sigterm = not isinstance(exc, KeyboardInterrupt)
        raise SearchInterrupted(
            f"{'SIGTERM' if sigterm else 'Ctrl-C'}: {label} was stopped and its parameters are queued again (it does "
            f"not count towards the budget); no further trial was started. Run the same command with --resume to "
            "continue the study", exit_code=143 if sigterm else 130) from None
    except Exception as exc:  # a failed trial is recorded and the study goes on
        reason = _reason(exc)
        trial.set_user_attr(FAIL_REASON, reason)
        say(f"{label}: failed — {reason}")
        raise TrialFailed(reason) from exc
    if not math.isfinite(value):
        trial.set_user_attr(FAIL_REASON, f"{search.objective} is {value}")
        say(f"{label}: failed — {search.objective} is {value}")
        raise TrialFailed(f"{search.objective} is {value}")
    say(f"{label}: {search.objective} {value:.4f}")
    return value


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = " | ".join(line.strip() for line in text[:3]) if text else ""
    name = type(exc).__name__
    if isinstance(exc, UserError):
        return first or name
    return f"{name}: {first}" if first else name


def trial_config(search: Search, number: int, values: dict[str, Any]) -> RunConfig:
    """The validated run config of trial ``number`` (its run directory is ``<study_dir>/trial-<n>``).

    Raises:
        UserError: the sampled combination is not a valid config (e.g. heads that do not divide the width).
    """
    raw = search.space.trial_config(search.base_raw, values)
    raw["run_name"] = f"{search.study_name}-trial-{number}"
    raw["output_dir"] = str(search.study_dir / f"trial-{number}")
    return validate_config(raw, source=f"trial {number} ({dump_values(values)})")


def _check_memory(search: Search, cfg: RunConfig, trial) -> None:
    """Prune a combination the estimator says cannot fit ``--gpu-mem`` before it starts."""
    if search.options.gpu_mem is None:
        return
    import optuna

    from tuneforge.estimate import estimate_memory, model_spec, setup_from_run

    source, setup = setup_from_run(cfg, device="cuda")
    key = json.dumps(source.model_dump() if hasattr(source, "model_dump") else source, sort_keys=True, default=str)
    if key not in search._specs:
        search._specs[key] = model_spec(source)
    bill = estimate_memory(search._specs[key], setup)
    usable = search.options.gpu_mem * (1 - GPU_MARGIN)
    trial.set_user_attr("estimated_gib", round(bill.total_gb, 3))
    if bill.total_gb > usable:
        reason = (f"estimated {bill.total_gb:.2f} GiB > {usable:.2f} GiB usable of --gpu-mem "
                  f"{search.options.gpu_mem:g} (not started)")
        trial.set_user_attr(PRUNE_REASON, reason)
        raise optuna.TrialPruned(reason)


def _train(search: Search, cfg: RunConfig, trial, train_log: bool):
    from tuneforge.search.callback import TrialCallback
    from tuneforge.train import train

    def report(step: int, value: float) -> bool:
        trial.report(value, step)
        return trial.should_prune()

    callback = TrialCallback(report if search.prunes else None)
    with contextlib.nullcontext() if train_log else silenced():  # the trial's own training lines
        result = train(cfg, callbacks=[callback])
    return result, callback


def _record_run(trial, result, callback) -> None:
    summary = result.summary or {}
    trial.set_user_attr("run_dir", str(result.run_dir))
    trial.set_user_attr("steps", summary.get("global_step"))
    trial.set_user_attr("train_tokens", trained_tokens(summary))
    trial.set_user_attr("runtime_s", summary.get("runtime_s"))
    if callback.evals:
        trial.set_user_attr("eval_loss", callback.evals[-1][1])


def trained_tokens(summary: dict) -> int | None:
    """Training tokens a run processed (its data's tokens x epochs done, as ``summary.json`` reports)."""
    value = summary.get("train_tokens_seen_approx")
    return int(value) if value is not None else None


def _score(search: Search, result, callback) -> float:
    if search.objective == TRAINER_OBJECTIVE:
        if not callback.evals:
            raise TrialFailed("the run reported no eval_loss (is the eval split empty?)")
        return callback.evals[-1][1]
    from tuneforge.evaluate.runner import evaluate_model, generation_settings

    gen = generation_settings(max_new_tokens=search.options.max_new_tokens)  # greedy: a trial's score is repeatable
    row = evaluate_model(str(result.run_dir), search.eval_records, [search.objective], gen)
    return float(row[search.objective])


def describe_values(trial) -> dict[str, Any]:
    """Sampled and tied values of a finished trial."""
    return {**trial.params, **trial.user_attrs.get("ties", {})}
