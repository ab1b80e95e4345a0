"""Many streams on a Ray cluster: `deluceva streams --ray [ADDRESS]`.

A pool of Ray actors, each running one stream at a time as a pool worker does (the same
`_run_stream`), the model and plan put in Ray's object store once and written to each actor's
own temporary folder. The pool asks for no more CPUs than the cluster has (cluster CPUs //
threads actors, `num_cpus` = threads each), so more streams than CPU slots queue here instead of
leaving an actor unscheduled and `ray.get` waiting forever. A killed actor is restarted by Ray
with empty state; its stream is handed out again and resumes from what it wrote, as in the
process pool. Outputs are written into OUT on the actor's machine: on a cluster of several
machines OUT must be a shared folder.

Ray is an optional extra: `pip install "deluceva[ray]"`.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

from deluceva.errors import DelucevaError
from deluceva.streams.pool import Ledger, Stream, StreamFiles, StreamsReport, StreamState

__all__ = ["run_streams_on_ray", "import_ray"]

PROGRESS_EVERY = 0.2  # seconds between an actor's progress messages (each is a call to the queue actor)


def import_ray():
    """Ray, or a one-line DelucevaError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise DelucevaError('--ray needs Ray, an optional extra: pip install "deluceva[ray]" (or pip install ray)') from None
    return ray


def run_streams_on_ray(streams: Sequence[Stream], options, out: str | os.PathLike, files: StreamFiles = StreamFiles(),
                       retries: int = 2, on_event: Callable[[str, StreamState], None] | None = None,
                       address: str | None = None, actors: int | None = None, poll: float = 0.2) -> StreamsReport:
    """`run_streams` on Ray: `address` None starts a local cluster (or joins the one this
    process already has), else joins the cluster there. `actors`: how many (default: cluster
    CPUs // threads, at most one per stream). Returns the report, also in OUT/summary.json."""
    ray = import_ray()
    from ray.exceptions import RayActorError, RayTaskError
    from ray.util.queue import Empty, Queue

    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    cpus = float(ray.cluster_resources().get("CPU", 1.0))
    count = actors or max(1, min(len(streams), int(cpus // options.threads)))
    if count * options.threads > cpus:
        raise DelucevaError(f"{count} actors of {options.threads} threads need {count * options.threads} CPUs; "
                            f"the cluster has {cpus:g}")
    files_in = {key: ray.put(Path(path).read_bytes()) for key, path in _input_files(options).items()}
    progress = Queue()
    actor_class = ray.remote(num_cpus=options.threads, max_restarts=-1, max_task_retries=0)(_StreamActor)
    pool = [actor_class.remote(files_in, options, str(out), files, progress) for _ in range(count)]
    ledger = Ledger(streams, out, retries, on_event)
    running: dict = {}  # ObjectRef -> (actor, stream name)
    idle = list(pool)
    interrupted = False
    try:
        while ledger.active():
            for name, resume in ledger.due():
                if not idle:
                    break
                actor = idle.pop()
                task = ledger.take(name, resume)
                running[actor.run.remote(*task)] = (actor, name)
            finished, _ = ray.wait(list(running), num_returns=1, timeout=poll) if running else ([], [])
            if not running:
                time.sleep(poll)
            # Progress after the wait: whatever a finished stream sent (before it returned) is
            # handled before its outcome.
            while True:
                try:
                    message = progress.get_nowait()
                except Empty:
                    break
                ledger.handle(message, _actor_of(running, message[1]))
            for ref in finished:
                actor, name = running.pop(ref)
                try:
                    kind, payload = ray.get(ref)
                except RayActorError as error:
                    kind, payload = "failed", f"actor died ({type(error).__name__}); restarted by Ray"
                except RayTaskError as error:  # a bug in the stream: reported, retried
                    kind, payload = "failed", str(error).splitlines()[0]
                ledger.handle((kind, name, payload), actor)
                idle.append(actor)  # a restarted actor serves again
    except KeyboardInterrupt:
        interrupted = True
        ledger.stop()
        raise
    finally:
        for actor in pool:
            ray.kill(actor, no_restart=True)
        report = ledger.report(count, interrupted)
    return report


def _actor_of(running: dict, name: str):
    return next((actor for actor, held in running.values() if held == name), None)


def _input_files(options) -> dict[str, str]:
    """The files a stream reads besides its video: the model, and a plan or learned controller
    given as a file."""
    found = {"model": options.model}
    if options.plan not in (None, "dense", "delta"):
        found["plan"] = options.plan
    if options.learned_model:
        found["learned_model"] = options.learned_model
    return found


class _StreamActor:
    """Runs streams one at a time, as a pool worker does, on its own copies of the model and plan."""

    def __init__(self, files_in: dict, options, out: str, files: StreamFiles, progress):
        import ray

        self.folder = tempfile.mkdtemp(prefix="deluceva-actor-")
        paths = {}
        for key, ref in files_in.items():
            path = Path(self.folder) / f"{key}{Path(getattr(options, key)).suffix}"
            path.write_bytes(ray.get(ref))
            paths[key] = str(path)
        self.options = dataclasses.replace(options, **paths)
        self.out, self.files, self.progress = Path(out), files, progress

    def run(self, stream: Stream, resume: bool, restarts: int, failed_at: float | None) -> tuple[str, object]:
        from deluceva.streams.pool import _run_stream

        try:
            summary = _run_stream(stream, resume, restarts, self.options, self.out, self.files, _Progress(self.progress),
                                  failed_at=failed_at)
            return "done", summary
        except DelucevaError as error:
            return "failed", str(error)


class _Progress:
    """The `events.send` a stream reports through, onto Ray's queue: "start" and "expected" at
    once, "frame" at most every PROGRESS_EVERY seconds."""

    def __init__(self, queue):
        self.queue, self.last = queue, 0.0

    def send(self, message: tuple) -> None:
        now = time.monotonic()
        if message[0] == "frame" and now - self.last < PROGRESS_EVERY:
            return
        self.last = now
        self.queue.put_nowait(message)
