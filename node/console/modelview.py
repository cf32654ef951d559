"""The models page and `/api/models`: every version in the repository with its provenance and the
rules that run it, how each version did (runs, shadow comparisons, verdicts) and the drift alarms."""

from __future__ import annotations

from typing import Any

from node.console.context import ConsoleContext
from node.store.modelruns import ModelRuns


def models_overview(ctx: ConsoleContext, comparisons: int = 50) -> dict[str, Any]:
    models = ctx.models
    runs = ModelRuns(ctx.index)
    uses = ctx.rules.file.model_uses(lambda name: (models.versions(name) or [None])[-1])
    stats = {(r["model"], r["version"], r["role"]): r for r in runs.summary()}
    versions = []
    for name, numbers in models.catalog().items():
        for number in reversed(numbers):
            try:
                spec = models.spec(f"{name}@{number}")
            except Exception as exc:  # a broken spec file: listed with its problem, not a 500
                versions.append({"model": name, "version": number, "problem": f"{type(exc).__name__}: {exc}"[:300]})
                continue
            p = spec.provenance
            versions.append({
                "model": name, "version": number, "latest": number == numbers[-1], "task": spec.task,
                "description": spec.description, "source": p.model_dump() if p else None,
                "rules": uses.get(f"{name}@{number}", []),
                "live": stats.get((name, number, "live")), "shadow": stats.get((name, number, "shadow")),
            })
    watch = ctx.config.inference.monitoring
    recent = runs.recent(watch.window_runs)
    for v in versions:
        v["recent"] = {figure: {"mean": m, "min": lo, "max": hi}
                       for figure, (m, lo, hi) in recent.get((v["model"], v["version"]), {}).items()}
    return {
        "versions": versions,
        "comparisons": runs.comparisons(comparisons),
        "drift": [{"model": d.model, "version": d.version, "figure": d.figure, "what": d.describe()}
                  for d in runs.drift(watch.baseline_runs, watch.window_runs, watch.tolerance)],
        "monitoring": watch.model_dump(),
    }
