"""A batch run as the Prefect API knows it, read through Prefect's client (`s2v-batch status RUN_ID`).

The client carries PREFECT_API_KEY, so this works against Prefect Cloud as against a server.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId
from prefect.client.schemas.objects import FlowRun
from prefect.client.schemas.sorting import FlowRunSort
from prefect.exceptions import ObjectNotFound
from prefect.settings import PREFECT_API_URL

PAGE = 200
"""Runs read per request (the API's page size)."""


@dataclass
class RowRun:
    """One row's subflow run: its state and the task runs of its stages."""

    name: str
    state: str
    message: str | None
    stages_done: int = 0
    stages: int = 0
    busy: list[str] = field(default_factory=list)
    """Task runs still running, waiting in the pool's queue or failed, each as 'name (state)'."""


class RunNotFound(LookupError):
    pass


async def api_problem() -> str | None:
    """Why the Prefect API at PREFECT_API_URL cannot be used, or None (also None without one: ephemeral API)."""
    api = PREFECT_API_URL.value()
    if not api:
        return None
    async with get_client() as client:
        error = await client.api_healthcheck()
    if error is None:
        return None
    return (f"cannot reach the Prefect API at {api} ({type(error).__name__}); start the server or fix "
            "PREFECT_API_URL / PREFECT_API_KEY (unset PREFECT_API_URL to run on a local ephemeral API)")


async def read_batch_run(run_id: str) -> tuple[FlowRun, list[RowRun]]:
    """The batch flow run `run_id` and its row runs, sorted by name (RunNotFound when there is none)."""
    async with get_client() as client:
        try:
            run = await client.read_flow_run(UUID(run_id))
        except ObjectNotFound:
            raise RunNotFound(run_id) from None
        children: list[FlowRun] = []
        while page := await client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run.id])),
            sort=FlowRunSort.NAME_ASC, limit=PAGE, offset=len(children),
        ):
            children += page
            if len(page) < PAGE:
                break
        rows = []
        for child in children:
            tasks = []
            while page := await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id={"any_": [child.id]}), limit=PAGE, offset=len(tasks)
            ):
                tasks += page
                if len(page) < PAGE:
                    break
            state = child.state
            rows.append(RowRun(
                name=child.name, state=state.name if state else "?", message=state.message if state else None,
                stages_done=sum(1 for t in tasks if t.state and t.state.is_completed()), stages=len(tasks),
                busy=[f"{t.name} ({t.state.name})" for t in tasks
                      if t.state and (t.state.is_running() or t.state.is_pending() or t.state.is_failed()
                                      or t.state.is_crashed())],
            ))
    return run, rows
