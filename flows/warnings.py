"""What the checks flagged on a row: the warnings it carries when it renders, and why a policy skipped it.

One place for both, so `run` (flows/batch.py) and `plan` (flows/preflight.py) say the same.
"""

from __future__ import annotations

from flows.settings import BatchSettings
from tasks.normalize.audio import audio_flags
from tasks.records import NormalizedAssets, Plan, SpeechAnalysis
from tasks.speech import language


def row_warnings(
    image_flags: list[str], assets: NormalizedAssets, speech: SpeechAnalysis, plan: Plan | None = None
) -> list[str]:
    """The row's warnings: image checks, audio checks (clipping), speech checks (language, fit), the planner's
    (unsafe cuts), and captions that are not aligned."""
    flags = image_flags + audio_flags(assets.audio_qc) + [f for f in speech.flags if f != language.SKIP_FLAG]
    if plan is not None:  # the plan carries the speech flags too: only its own are added
        flags += [f for f in plan.flags if f not in speech.flags]
    if speech.approximate and assets.script:
        flags.append("captions approximate: spread evenly over the speech, not aligned")
    if not assets.script:
        flags.append("no script: no captions")
    return flags


def skip_reasons(speech: SpeechAnalysis, settings: BatchSettings) -> tuple[list[str], str] | None:
    """When a policy skips the row for its speech: the flags that made it, and the policies that did
    (to name in its error); None when the row goes on."""
    if not language.should_skip(speech):
        return None
    flags = [f for f in speech.flags if f != language.SKIP_FLAG]
    reasons, policies = [], []
    for codes, name in ((language.MISMATCH_FLAGS, "mismatch_policy"), (language.LANGUAGE_FLAGS, "language_policy")):
        if (found := [f for f in flags if f.startswith(codes)]) and getattr(settings, name) == "skip":
            reasons += found
            policies.append(f"{name} 'skip'")
    return reasons or flags, " and ".join(policies) or "policy"
