"""The `pickup` flow: run every new manifest under a prefix once, and never twice.

Deployed on a cron schedule (prefect.yaml, deployment `nightly`). Where to look and where to
write are the `prefix` and `out` parameters, else the Prefect Variables `s2v_pickup_prefix`
and `s2v_pickup_out`, read when the run starts (so they change without a redeploy); with
neither the run fails, naming both, instead of scanning the worker's working folder. Each
new manifest is claimed in the registry under OUT/.s2v/manifests before its batch starts,
so overlapping or duplicated scheduled runs split the work instead of repeating it. A
manifest whose batch could not run is released again: nothing is marked processed that was
not. The pickup ends `Completed`, or `Partial` when a batch could not run or had failed rows.
"""

from __future__ import annotations

import asyncio
import posixpath

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from prefect.states import Completed, Failed, State
from prefect.variables import Variable

from flows.batch import batch
from flows.settings import BatchSettings
from flows.states import report_of
from tasks import layout, storage
from tasks.registry import Candidate, ManifestRegistry, PickupError, find_manifests


def registry_for(out: str) -> ManifestRegistry:
    return ManifestRegistry(layout.registry_uri(out))


def output_for(out: str, candidate: Candidate) -> str:
    """Each manifest's videos go to OUT/<manifest name without .csv>/."""
    stem = posixpath.basename(candidate.uri).rsplit(".", 1)[0]
    return storage.join(out, stem)


VARIABLES = {"prefix": "s2v_pickup_prefix", "out": "s2v_pickup_out"}
"""The Prefect Variable read for each parameter left unset."""


async def _given(name: str, value: str | None) -> str | None:
    """The parameter, else its Prefect Variable; None when neither is set or it is blank."""
    if value is None:
        value = await Variable.aget(VARIABLES[name], default=None)
    return str(value).strip() or None if value is not None else None


@flow(name="pickup")
async def pickup(prefix: str | None = None, out: str | None = None, settings: BatchSettings | None = None) -> State:
    """Find manifests under `prefix` not yet processed into `out`, and run each as a batch; returns the
    summary (ran, already processed, claimed elsewhere, could not run) as the state's result."""
    settings = settings or BatchSettings()
    logger = get_run_logger()
    given = {"prefix": await _given("prefix", prefix), "out": await _given("out", out)}
    if missing := [name for name, value in given.items() if value is None]:
        return Failed(message="; ".join(
            f"parameter '{name}' is empty and the Prefect Variable {VARIABLES[name]} is not set: give the "
            f"{'folder or s3:// prefix to find manifests in' if name == 'prefix' else 'output folder or prefix'}"
            for name in missing))
    prefix, out = given["prefix"], given["out"]
    owner = f"flow-run {flow_run.get_id() or 'local'}"
    try:
        candidates = await asyncio.to_thread(find_manifests, prefix)
    except PickupError as exc:
        return Failed(message=str(exc))
    registry = registry_for(out)
    summary: dict[str, list] = {"ran": [], "already_processed": [], "claimed_elsewhere": [], "could_not_run": []}
    for candidate in candidates:
        if await asyncio.to_thread(registry.is_processed, candidate.digest):
            summary["already_processed"].append(candidate.uri)
            continue
        if not await asyncio.to_thread(registry.claim, candidate, owner):
            info = await asyncio.to_thread(registry.claim_info, candidate.digest) or {}
            logger.info("%s is taken by %s since %s; skipping", candidate.uri, info.get("owner"),
                        info.get("claimed_at"))
            summary["claimed_elsewhere"].append(candidate.uri)
            continue
        target = output_for(out, candidate)
        logger.info("running %s into %s", candidate.uri, target)
        state = await batch(candidate.uri, target, settings, return_state=True)
        try:
            report = await report_of(state)  # Completed, Partial or Failed: the batch ran, its rows are reported
        except Exception:
            await asyncio.to_thread(registry.release, candidate)
            logger.error("%s could not run: %s", candidate.uri, state.message)
            summary["could_not_run"].append({"manifest": candidate.uri, "error": state.message})
            continue
        await asyncio.to_thread(registry.mark_processed, candidate, layout.report_uri(target), report["counts"])
        summary["ran"].append({"manifest": candidate.uri, "out": target, "counts": report["counts"],
                               "state": state.name})
    with_failures = [r for r in summary["ran"] if r["counts"].get("failed")]
    message = (f"{len(summary['ran'])} ran ({len(with_failures)} with failed rows), "
               f"{len(summary['already_processed'])} already processed, {len(summary['claimed_elsewhere'])} taken "
               f"by another run, {len(summary['could_not_run'])} could not run")
    logger.info("pickup done: %s", message)
    if summary["could_not_run"] or with_failures:
        return Completed(name="Partial", message=message, data=summary)
    return Completed(message=message, data=summary)
