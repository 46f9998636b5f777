"""Rounds as a Prefect deployment whose every run does the next round of an experiment: served here on a
schedule, or registered on a work pool whose workers (one per GPU machine) run it.

Needs a real Prefect server (`prefect server start`); `prefect deployment run` triggers a round by hand.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import socket
from datetime import datetime, timezone
from uuid import UUID

from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.runner import Runner

from flows.config import load_config

# One run of the deployment at a time, kept by the server: a run that falls due while a round runs is
# cancelled (CANCEL_NEW), not queued, and Prefect 3.8 cancels the same way a run it would mark Late. A
# schedule faster than a round therefore skips runs instead of piling them up in SCHEDULED; the run that
# comes due after a round ends does the next round.
ONE_AT_A_TIME = ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW)
SKIPS = "a run that falls due while a round runs is skipped (cancelled), not queued"
QUEUES = "runs triggered while a round runs wait their turn; scheduled ones that fall due meanwhile are skipped"


@flow(name="asymre-next-round", persist_result=False)
def next_round(config: str | None = None, sets: list[str] | None = None, store: str | None = None):
    """Run rounds up to (and including) the first one not yet complete; print that round in one line (the
    serving terminal's record of the schedule: Prefect's own logs stay at WARNING). Holds the experiment's
    and this machine's concurrency slots throughout (see take_turn); a run its schedule started while the
    experiment's round runs elsewhere ends Cancelled at once."""
    from prefect.states import Cancelled

    cfg = load_config(config, sets or [])
    if store is not None:
        cfg = cfg.model_copy(update={"store": store})
    with contextlib.ExitStack() as held:
        if not take_turn(held, cfg.name):
            _say(f"{cfg.name}  skipped: a round of {cfg.name} runs elsewhere ({experiment_limit(cfg.name)})")
            return Cancelled(message=f"skipped: a round of {cfg.name} was running")
        # here, not at the top: torch, which neither `serve --work-pool` nor a skipped run needs
        from flows.iterate import completed_rounds, experiment_flow, format_summary

        k = completed_rounds(cfg.store, cfg.name)  # read only once this run's turn has come
        try:
            summaries = experiment_flow(cfg, rounds=k + 1)
        except Exception as err:
            first = (str(err).strip().splitlines() or [""])[0]
            _say(f"{cfg.name}  round {k} failed: {type(err).__name__}: {first} (asymre status {cfg.name})")
            raise
        finally:
            skipped = skip_missed_runs(k)
    meanwhile = f"  ({skipped} runs that fell due meanwhile skipped)" if skipped else ""
    _say(f"{cfg.name}  {format_summary(summaries[-1])}{meanwhile}")
    return summaries


def experiment_limit(experiment: str) -> str:
    """The global concurrency limit (1 slot) that keeps rounds of one experiment from overlapping."""
    return f"asymre-experiment-{experiment}"


def machine_limit() -> str:
    """This machine's global concurrency limit (1 slot unless a user raises it): one round at a time, of any
    experiment, so two experiments never share its GPUs. Prefect's per-worker pattern: a limit named after
    the worker, taken inside the run (its worker starts the run on this machine)."""
    return f"asymre-worker-{socket.gethostname()}"


def take_turn(held: contextlib.ExitStack, experiment: str) -> bool:
    """Take the experiment's slot, then this machine's, into `held` (released when it closes), waiting for
    each; False, holding nothing, when this run was started by its schedule and the experiment's round runs
    elsewhere. Always in this order: a run waits for the machine only once it holds its experiment, and one
    that holds a machine waits for nothing, so no two runs wait for each other."""
    from prefect.concurrency.sync import concurrency

    names = [experiment_limit(experiment), machine_limit()]
    for name, busy in zip(names, (f"a round of {experiment} runs", "this machine runs a round")):
        limit = _limit(name)
        # Whether it is taken now decides only what to say, and whether a scheduled run skips; the acquisition
        # below is what holds (a non-blocking acquisition would make Prefect log an ERROR for a mere wait).
        if limit.active and limit.active_slots >= limit.limit:
            if name == names[0] and _started_by_schedule():
                return False
            _say(f"{experiment}  waiting: {busy} ({name})")
        # The lease is renewed while the run lives and lapses (300 s) if its process dies; a renewal that fails
        # once does not stop a round (the next one retries).
        held.enter_context(concurrency(name, strict=True, raise_on_lease_renewal_failure=False))
    return True


def _limit(name: str):
    """The global concurrency limit `name`, created with 1 slot on first use (one that exists is kept as it is)."""
    with get_client(sync_client=True) as client:
        try:
            return client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            with contextlib.suppress(ObjectAlreadyExists):  # another run may create it meanwhile
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
            return client.read_global_concurrency_limit_by_name(name)


def _started_by_schedule() -> bool:
    from prefect.runtime import flow_run

    if flow_run.id is None:
        return False
    with get_client(sync_client=True) as client:
        return bool(client.read_flow_run(UUID(flow_run.id)).auto_scheduled)


def skip_missed_runs(k: int) -> int:
    """Cancel this deployment's runs that its schedule made due while round k ran and that have not started:
    the next round starts at the schedule's next time, not once for every time it missed. (The server's
    CANCEL_NEW does the same only for the runs it marks Late while the round runs, and under load it marks them
    late.) Runs triggered by hand are left to run. Returns how many; 0 outside a deployment run."""
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterDeploymentId,
        FlowRunFilterExpectedStartTime,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.responses import SetStateStatus
    from prefect.runtime import deployment
    from prefect.states import Cancelled

    if deployment.id is None:
        return 0
    missed = FlowRunFilter(
        deployment_id=FlowRunFilterDeploymentId(any_=[UUID(deployment.id)]),
        state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED])),
        expected_start_time=FlowRunFilterExpectedStartTime(before_=datetime.now(timezone.utc)),
    )
    skipped = 0
    with get_client(sync_client=True) as client:
        while True:  # pages of 200, until one cancels nothing (a run that started meanwhile refuses)
            runs = client.read_flow_runs(flow_run_filter=missed, limit=200)
            cancelled = sum(
                client.set_flow_run_state(run.id, Cancelled(message=f"fell due while round {k} ran: skipped")).status
                == SetStateStatus.ACCEPT
                for run in runs
                if run.auto_scheduled
            )
            skipped += cancelled
            if not cancelled:
                return skipped


def _say(line: str) -> None:
    # The run's process shares the serving process's stdout; flushed so a line shows when its round ends.
    print(f"{datetime.now():%Y-%m-%d %H:%M:%S}  {line}", flush=True)


class _Runner(Runner):
    """Prefect 3.8's runner answers SIGTERM by calling its stop() from inside its own event loop, where it
    only makes a coroutine that never runs, and then sys.exit(0) in the middle of polling: tracebacks, and a
    round in progress left running in a process nobody watches. This one stops from inside the loop: the
    run in progress is killed and marked cancelled (the next run resumes the round), polling ends and
    start() returns."""

    stopped_by: str | None = None

    async def start(self, *args, **kwargs) -> None:
        self._serving_loop = asyncio.get_running_loop()
        await super().start(*args, **kwargs)

    def handle_sigterm(self, *args) -> None:
        self.stopped_by = "SIGTERM"
        # The round in progress is killed, not sent SIGTERM (which would log its crash at ERROR for every
        # task in flight): the store resumes a killed round as any interrupted one. What the runner then logs
        # about a run it can no longer find is silenced; the command prints one line when it has stopped.
        logging.disable(logging.ERROR)
        for run in multiprocessing.active_children():
            run.kill()
        self._serving_loop.call_soon_threadsafe(self._stop_in_loop)

    def _stop_in_loop(self) -> None:
        if self.started:  # a second SIGTERM while stopping changes nothing
            self._stopping_task = asyncio.ensure_future(self.astop())


def serve(
    config: str | None, sets: list[str], store: str, name: str, cron: str | None, interval: float | None
) -> str | None:
    """Block, serving the deployment `asymre-next-round/<name>` on the schedule, until SIGTERM or Ctrl-C;
    returns which one stopped it."""
    runner = _Runner(name=name, limit=1)  # and this process starts at most one run at a time
    runner.add_flow(
        next_round,
        name=name,
        cron=cron,
        interval=interval,
        concurrency_limit=ONE_AT_A_TIME,
        parameters={"config": config, "sets": list(sets), "store": store},
        description=f"one more round of experiment {name} each time it fires; {SKIPS}",
    )
    try:
        asyncio.run(runner.start())
    except KeyboardInterrupt:
        return "Ctrl-C"
    return runner.stopped_by


class PoolError(Exception):
    """A work pool that cannot take the deployment (the message names the fix)."""


def register(
    config: str | None,
    sets: list[str],
    store: str,
    name: str,
    pool: str,
    cron: str | None = None,
    interval: float | None = None,
) -> bool:
    """Register the deployment `asymre-next-round/<name>` on the process work pool `pool` (created if missing)
    and the experiment's concurrency limit (1 slot); returns whether the pool was created. Its workers import
    the flow from the installed asymre package (a module-path entrypoint: no image, no code upload) and read the
    config, the store and any credentials from their own machine."""
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.deployments.runner import EntrypointType
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            existing = client.read_work_pool(pool)
        except ObjectNotFound:
            existing = None
        if existing is not None and existing.type != ProcessWorker.type:
            raise PoolError(
                f"work pool {pool!r} is a {existing.type!r} pool; asymre registers on a process pool: "
                f"give another --work-pool name (asymre creates it) or `prefect work-pool create NAME --type process`"
            )
        if existing is None:
            template = ProcessWorker.get_default_base_job_template()
            client.create_work_pool(WorkPoolCreate(name=pool, type=ProcessWorker.type, base_job_template=template))
        # the experiment's limit is 1 whatever it was: more would let its rounds overlap
        client.upsert_global_concurrency_limit_by_name(experiment_limit(name), 1)
    deployment = next_round.to_deployment(
        name=name,
        cron=cron,
        interval=interval,
        parameters={"config": config, "sets": list(sets), "store": store},
        description=f"one more round of experiment {name} each time it runs; {QUEUES}",
        entrypoint_type=EntrypointType.MODULE_PATH,
        work_pool_name=pool,
    )
    deployment.apply(work_pool_name=pool)
    return existing is None
