"""Scheduled rounds: a Prefect deployment whose every run does the next round of an experiment.

Needs a real Prefect server (`prefect server start`); `prefect deployment run` triggers a round by hand.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
from datetime import datetime, timezone

from prefect import flow
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.runner import Runner

from flows.config import load_config
from flows.iterate import completed_rounds, experiment_flow, format_summary

# One run of the deployment at a time, kept by the server: a run that falls due while a round runs is
# cancelled (CANCEL_NEW), not queued, and Prefect 3.8 cancels the same way a run it would mark Late. A
# schedule faster than a round therefore skips runs instead of piling them up in SCHEDULED; the run that
# comes due after a round ends does the next round.
ONE_AT_A_TIME = ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW)
SKIPS = "a run that falls due while a round runs is skipped (cancelled), not queued"


@flow(name="asymre-next-round", persist_result=False)
def next_round(config: str | None = None, sets: list[str] | None = None, store: str | None = None) -> list[dict]:
    """Run rounds up to (and including) the first one not yet complete; print that round in one line (the
    serving terminal's record of the schedule: Prefect's own logs stay at WARNING)."""
    cfg = load_config(config, sets or [])
    if store is not None:
        cfg = cfg.model_copy(update={"store": store})
    k = completed_rounds(cfg.store, cfg.name)
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


def skip_missed_runs(k: int) -> int:
    """Cancel this deployment's runs that fell due while round k ran and have not started: the next round
    starts at the schedule's next time, not once for every time it missed. (The server's CANCEL_NEW does the
    same only for the runs it marks Late while the round runs, and under load it marks them late.) Returns
    how many; 0 outside a deployment run."""
    from uuid import UUID

    from prefect.client.orchestration import get_client
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
