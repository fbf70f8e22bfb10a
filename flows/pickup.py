"""The `pickup` flow: run every new manifest under a prefix once, and never twice.

Deployed on a cron schedule (prefect.yaml, deployment `nightly`). Each new manifest is
claimed in the registry under OUT/.s2v/manifests before its batch starts, so overlapping
or duplicated scheduled runs split the work instead of repeating it. A manifest whose
batch could not run is released again: nothing is marked processed that was not.
"""

from __future__ import annotations

import asyncio
import posixpath

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from prefect.states import Failed, State

from flows.batch import batch
from flows.settings import BatchSettings
from tasks import layout, storage
from tasks.registry import Candidate, ManifestRegistry, PickupError, find_manifests


def registry_for(out: str) -> ManifestRegistry:
    return ManifestRegistry(layout.registry_uri(out))


def output_for(out: str, candidate: Candidate) -> str:
    """Each manifest's videos go to OUT/<manifest name without .csv>/."""
    stem = posixpath.basename(candidate.uri).rsplit(".", 1)[0]
    return storage.join(out, stem)


@flow(name="pickup")
async def pickup(prefix: str, out: str, settings: BatchSettings | None = None) -> dict | State:
    """Find manifests under `prefix` not yet processed into `out`, and run each as a batch."""
    settings = settings or BatchSettings()
    logger = get_run_logger()
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
        if not state.is_completed():
            await asyncio.to_thread(registry.release, candidate)
            logger.error("%s could not run: %s", candidate.uri, state.message)
            summary["could_not_run"].append({"manifest": candidate.uri, "error": state.message})
            continue
        report = await state.aresult()
        await asyncio.to_thread(registry.mark_processed, candidate, layout.report_uri(target), report["counts"])
        summary["ran"].append({"manifest": candidate.uri, "out": target, "counts": report["counts"]})
    logger.info("pickup done: %d ran, %d already processed, %d taken by another run, %d could not run",
                len(summary["ran"]), len(summary["already_processed"]), len(summary["claimed_elsewhere"]),
                len(summary["could_not_run"]))
    return summary
