"""The pipeline: a completed study is routed, its series run through the models, and the results
(SEG, SR) are written and queued for delivery.

Jobs are the work items in the index. Routing happens when the study completes (so that the
decision, its rules version and its explanation are stored with the study, and priorities
order the queue); a bounded pool of workers then runs the decisions. Everything a job writes
is keyed by the job, so a job re-run after a crash produces the same objects with the same
UIDs and the same outbox rows: the PACS receives each result once.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from inference.pipeline import ClassificationResult, SegmentationResult, classify, segment
from inference.repository import ModelRepository
from inference.volume import load_series, read_series
from node import logs
from node.assemble.workqueue import CompletedStudy, WorkQueue
from node.config import NodeConfig
from node.encode.seg import build_seg
from node.encode.sr import build_sr
from node.encode.uids import ResultUIDs
from node.route.live import LiveRules
from node.route.rules import SENDER
from node.route.study import study_from_index
from node.send.outbox import Outbox
from node.store.index import Index
from node.store.spool import Spool

log = logging.getLogger("node.jobs")


class JobError(RuntimeError):
    pass


class Pipeline:
    def __init__(self, config: NodeConfig, index: Index, queue: WorkQueue, outbox: Outbox, rules: LiveRules,
                 models: ModelRepository, spool: Spool):
        self.config = config
        self.index = index
        self.queue = queue
        self.outbox = outbox
        self.rules = rules
        self.models = models
        self.spool = spool
        self.data_dir = Path(config.storage.data_dir)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._backends: dict[str, Any] = {}
        self._backend_locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    # -- routing at completion -----------------------------------------------------------------

    def quiet_period_for(self, study_uid: str) -> float | None:
        view = study_from_index(self.index, study_uid, self.data_dir)
        return self.rules.current.quiet_period_for(view) if view else None

    def route(self, study_uid: str) -> None:
        """Evaluate the rules for a just-completed study and store the decision with its job."""
        rows = self.index.query(
            "SELECT id FROM work_items WHERE study_uid=? AND state='queued' ORDER BY id DESC LIMIT 1", (study_uid,))
        view = study_from_index(self.index, study_uid, self.data_dir)
        if not rows or view is None:
            return
        item_id = int(rows[0]["id"])
        started = time.time()
        decision = self.rules.current.evaluate(view)
        applied = [{"rule": rule.name, "series_uid": series.series_uid if series else None,
                    "actions": rule.actions.model_dump()} for rule, series in decision.applied]
        explanation = decision.explain()
        with self.index.transaction() as db:
            db.execute(
                "UPDATE work_items SET priority=?, rules_version=?, decision=?, explanation=?, stages=? WHERE id=?",
                (decision.priority, decision.version, json.dumps({"applied": applied, **decision.to_json()}),
                 explanation, json.dumps({"route": [started, time.time()]}), item_id),
            )
        if not applied:
            self.queue.ignore(item_id, "no routing rule applies")
        logs.event(log, "study_routed", study_uid=study_uid, job=item_id, rules_version=decision.version,
                   rules=[a["rule"] for a in applied])
        self._wake.set()

    # -- workers -------------------------------------------------------------------------------

    def start(self) -> None:
        for n in range(self.config.pipeline.workers):
            thread = threading.Thread(target=self._work, name=f"pipeline-{n}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        for thread in self._threads:
            thread.join(30)
        for backend in self._backends.values():
            backend.close()

    def _work(self) -> None:
        while not self._stop.is_set():
            item = self.queue.claim()
            if item is None:
                self._wake.wait(1.0)
                self._wake.clear()
                continue
            self.run(item)

    def run(self, item: CompletedStudy) -> None:
        started = time.time()
        try:
            self._run(item)
        except Exception as exc:  # the job fails with its reason; the service and other jobs go on
            reason = str(exc) if isinstance(exc, JobError) else f"{type(exc).__name__}: {exc}"
            self.queue.fail(item.work_item_id, reason[:2000])
            logs.event(log, "job_failed", logging.ERROR, job=item.work_item_id, study_uid=item.study_uid,
                       reason=reason[:500])
            return
        self.queue.done(item.work_item_id)
        logs.event(log, "job_done", job=item.work_item_id, study_uid=item.study_uid,
                   seconds=round(time.time() - started, 3))

    def _run(self, item: CompletedStudy) -> None:
        row = self.index.query("SELECT decision, stages FROM work_items WHERE id=?", (item.work_item_id,))[0]
        if not row["decision"]:  # completed before routing ran (e.g. a crash in between)
            self.route(item.study_uid)
            row = self.index.query("SELECT decision, stages FROM work_items WHERE id=?", (item.work_item_id,))[0]
        decision = json.loads(row["decision"])
        stages = json.loads(row["stages"] or "{}")
        calling = self.index.query(
            "SELECT calling_ae FROM instances WHERE study_uid=? ORDER BY received_at DESC LIMIT 1", (item.study_uid,))
        caller = calling[0]["calling_ae"] if calling else ""
        files_by_series = {s.series_uid: list(s.files) for s in item.series}
        for applied in decision["applied"]:
            actions = applied["actions"]
            for destination in actions["forward_to"]:
                files = [f for fs in files_by_series.values() for f in fs]
                self.outbox.enqueue(f"{item.work_item_id}:{applied['rule']}:forward", item.study_uid,
                                    self._destination(destination, caller), files)
            for model in actions["run"]:
                self._run_model(item, applied, model, caller, files_by_series, stages)
        self._save_stages(item.work_item_id, stages)

    def _run_model(self, item: CompletedStudy, applied: dict, model: str, caller: str,
                   files_by_series: dict[str, list[Path]], stages: dict) -> None:
        series_uid = applied["series_uid"]
        if series_uid not in files_by_series:
            raise JobError(f"series {series_uid} chosen by rule {applied['rule']} has no stored instances")
        with _stage(stages, "load"):
            volume = load_series(read_series(files_by_series[series_uid]))
        spec = self.models.spec(model)
        with _stage(stages, "inference"), self._backend(model) as backend:
            result = segment(volume, spec, backend) if spec.task == "segmentation" else classify(volume, spec, backend)
        job_key = f"{item.work_item_id}:{applied['rule']}:{model}"
        uids = ResultUIDs(job_key, model)
        outputs = applied["actions"]["outputs"]
        for name in applied["actions"]["send_to"]:
            destination = self._destination(name, caller)
            options = self.config.destinations[destination].output(self.config.output)
            with _stage(stages, "encode"):
                files = self._write_results(result, options, uids, outputs, job_key)
            with _stage(stages, "queue"):
                self.outbox.enqueue(f"{job_key}:{options.variant}", item.study_uid, destination, files)
        logs.event(log, "model_ran", job=item.work_item_id, model=model, series_uid=series_uid,
                   findings=len(result.findings) if isinstance(result, SegmentationResult) else None,
                   seconds={k: round(v, 3) for k, v in result.seconds.items()})

    def _write_results(self, result: SegmentationResult | ClassificationResult, options: Any, uids: ResultUIDs,
                       outputs: list[str], job_key: str) -> list[Path]:
        folder = self.data_dir / "results" / job_key.replace(":", "_") / options.variant
        seg = build_seg(result, options, uids) if isinstance(result, SegmentationResult) else None
        objects = []
        if seg is not None and "SEG" in outputs:
            objects.append(seg)
        if "SR" in outputs:
            objects.append(build_sr(result, options, uids, seg))
        files = []
        for obj in objects:
            target = folder / f"{obj.SOPInstanceUID}.dcm"
            self.spool.store(target, [_encode(obj)])
            files.append(target)
        return files

    def _destination(self, name: str, caller: str) -> str:
        if name != SENDER:
            return name
        found = self.config.destination_for_caller(caller)
        if found is None:
            raise JobError(f"results go back to the sender, but no destination has the calling AE title {caller!r}")
        return found

    @contextmanager
    def _backend(self, model: str) -> Iterator[Any]:
        with self._lock:
            if model not in self._backends:
                triton = self.config.inference.triton
                self._backends[model] = self.models.backend(model, triton.url, triton.protocol, triton.shared_memory,
                                                            triton.timeout_s, triton.retries)
                self._backend_locks[model] = threading.Lock()
        with self._backend_locks[model]:
            yield self._backends[model]

    def _save_stages(self, item_id: int, stages: dict) -> None:
        with self.index.transaction() as db:
            db.execute("UPDATE work_items SET stages=? WHERE id=?", (json.dumps(stages), item_id))


@contextmanager
def _stage(stages: dict, name: str) -> Iterator[None]:
    started = time.time()
    yield
    previous = stages.get(name)
    # a stage that runs more than once (several models or destinations) spans first start to last end
    stages[name] = [previous[0] if previous else started, time.time()]


def _encode(dataset: Any) -> bytes:
    from io import BytesIO

    buffer = BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
