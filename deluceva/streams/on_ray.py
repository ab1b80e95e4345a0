"""Many streams on a Ray cluster: `deluceva streams --ray [ADDRESS]`.

A pool of Ray actors, each running one stream at a time as a pool worker does (the same
`_run_stream`), the model and plan put in Ray's object store once and written to each actor's
own temporary folder (removed when the actor ends, or by the next actor on that machine when it
was killed). The pool asks for no more CPUs than the cluster has (cluster CPUs // threads
actors, `num_cpus` = threads each), so more streams than CPU slots queue here instead of leaving
an actor unscheduled and `ray.get` waiting forever.

An actor that dies (killed, or its node lost) is not restarted in place: the pool replaces it
with a new actor wherever the cluster still has room, and gives the stream to the first actor
that is ready, where it resumes from what it wrote, as in the process pool. A new actor is
handed work only once it is up, so a replacement the shrunken cluster cannot place never holds a
stream. Outputs are written into OUT on the actor's machine: on a cluster of several machines OUT
must be a shared folder.

Ctrl-C asks every running actor to stop after its current frame (each writes what it finished,
as a pool worker does) and waits for them; a second Ctrl-C stops waiting.

Ray is an optional extra: `pip install "deluceva[ray]"`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

from deluceva.errors import DelucevaError
from deluceva.streams.pool import Ledger, Stream, StreamFiles, StreamsInterrupted, StreamsReport, StreamState

__all__ = ["run_streams_on_ray", "import_ray", "ACTOR_FOLDER_PREFIX"]

PROGRESS_EVERY = 0.2  # seconds between an actor's progress messages (each is a call to the queue actor)
STOP_WAIT = 60.0  # seconds Ctrl-C waits for the actors to write what they finished
ACTOR_FOLDER_PREFIX = "deluceva-actor-"  # + the actor process's pid + "-": its copies of the model and plan


def import_ray():
    """Ray, or a one-line DelucevaError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise DelucevaError('--ray needs Ray, an optional extra: pip install "deluceva[ray]" (or pip install ray)') from None
    return ray


def run_streams_on_ray(streams: Sequence[Stream], options, out: str | os.PathLike, files: StreamFiles = StreamFiles(),
                       retries: int = 2, on_event: Callable[[str, StreamState], None] | None = None,
                       address: str | None = None, actors: int | None = None, poll: float = 0.2,
                       existing: str = "refuse", verbose: bool = False) -> StreamsReport:
    """`run_streams` on Ray: `address` None starts a local cluster (or joins the one this
    process already has), else joins the cluster there. `actors`: how many (default: cluster
    CPUs // threads, at most one per stream). `existing`: see `deluceva.streams.pool.prepare_out`.
    Ray's own start-up lines and its workers' logs are shown only when `verbose`.

    Returns the report, also in OUT/summary.json; a KeyboardInterrupt raises StreamsInterrupted
    (carrying it) once the actors wrote what they finished.
    """
    ray = import_ray()
    from ray.exceptions import RayError, RayTaskError
    from ray.util.queue import Empty, Queue
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if not ray.is_initialized():
        if not verbose:  # Ray's start-up warnings go through its loggers (to stderr, unconfigured)
            logging.getLogger("ray").setLevel(logging.ERROR)
        ray.init(address=address, include_dashboard=False, log_to_driver=verbose, configure_logging=verbose,
                 logging_level=logging.INFO if verbose else logging.ERROR)
    ledger = Ledger(streams, out, retries, on_event, existing)  # (refusals before any actor starts)
    cpus = float(ray.cluster_resources().get("CPU", 1.0))
    count = actors or max(1, min(len(streams), int(cpus // options.threads)))
    if count * options.threads > cpus:
        raise DelucevaError(f"{count} actors of {options.threads} threads need {count * options.threads} CPUs; "
                            f"the cluster has {cpus:g}")
    files_in = {key: ray.put(Path(path).read_bytes()) for key, path in _input_files(options).items()}
    # The progress queue lives beside this process, so that losing any other node leaves it up.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    progress = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})
    # max_concurrency 2: `stop` runs beside `run`. No restarts in place (see the module's docstring).
    actor_class = ray.remote(num_cpus=options.threads, max_restarts=0, max_task_retries=0,
                             max_concurrency=2)(_StreamActor)
    starting: dict = {}  # ObjectRef of ready() -> actor
    running: dict = {}  # ObjectRef of run() -> (actor, stream name)
    idle: list = []
    every: list = []  # every actor started, to end them all
    pids: list[int] = []  # their processes' (for the folders of those killed on this machine)

    def start_actor():
        actor = actor_class.remote(files_in, options, str(out), files, progress)
        every.append(actor)
        starting[actor.ready.remote()] = actor

    def replace(lost):
        """A dead actor's place: a new one where the cluster, as it is now, has room."""
        ray.kill(lost, no_restart=True)
        room = int(float(ray.cluster_resources().get("CPU", 0.0)) // options.threads)
        if len(starting) + len(running) + len(idle) < min(count, max(room, 1)):
            start_actor()

    def drain():
        while True:
            try:
                message = progress.get_nowait()
            except Empty:
                return
            ledger.handle(message, _actor_of(running, message[1]))

    def collect(ref):
        actor, name = running.pop(ref)
        try:
            kind, payload = ray.get(ref)
        except RayTaskError as error:  # a bug in the stream: reported, retried
            kind, payload = "failed", str(error).splitlines()[0]
        except RayError as error:  # the actor died, or is unreachable (its node lost): it is replaced
            kind, payload = "died", f"actor died ({_why(error)})"
        ledger.handle((kind, name, payload), actor)
        if kind == "died":
            replace(actor)
        else:
            idle.append(actor)

    interrupted = False
    try:
        for _ in range(count):
            start_actor()
        while ledger.active():
            for name, resume in ledger.due():
                if not idle:
                    break
                actor = idle.pop()
                task = ledger.take(name, resume)
                running[actor.run.remote(*task)] = (actor, name)
            refs = list(running) + list(starting)
            finished, _ = ray.wait(refs, num_returns=len(refs), timeout=poll) if refs else ([], [])
            if not refs:
                time.sleep(poll)
            # Progress after the wait: whatever a finished stream sent (before it returned) is
            # handled before its outcome.
            drain()
            for ref in finished:
                if ref in starting:
                    actor = starting.pop(ref)
                    try:
                        pids.append(ray.get(ref)[0])
                        idle.append(actor)
                    except RayError:  # lost before it was up (its node went): another takes its place
                        replace(actor)
                else:
                    collect(ref)
    except KeyboardInterrupt:
        interrupted = True
        for actor, _ in running.values():
            actor.stop.remote()
        try:
            deadline = time.monotonic() + STOP_WAIT
            while running and time.monotonic() < deadline:
                finished, _ = ray.wait(list(running), num_returns=len(running), timeout=poll)
                drain()
                for ref in finished:
                    collect(ref)
        except KeyboardInterrupt:
            pass  # a second Ctrl-C: stop waiting
        drain()
        ledger.stop()
    finally:
        waiting = {id(actor) for actor in starting.values()}  # (never up: nothing to close)
        closing = [actor.close.remote() for actor in every if id(actor) not in waiting]
        if closing:
            ray.wait(closing, num_returns=len(closing), timeout=10)
        for actor in every:
            ray.kill(actor, no_restart=True)
        _remove_dead_actors_folders(wait_for=pids)
        report = ledger.report(count, interrupted)
    if interrupted:
        raise StreamsInterrupted(report)
    return report


def _why(error) -> str:
    """A one-line reason for an actor's death."""
    from ray.exceptions import ActorUnavailableError, NodeDiedError

    text = str(error)
    if isinstance(error, (ActorUnavailableError, NodeDiedError)) or (
            "node" in text and any(word in text for word in ("terminated", "died", "dead"))):
        return "its node was lost"
    return type(error).__name__


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

        _remove_dead_actors_folders()
        self.folder = tempfile.mkdtemp(prefix=f"{ACTOR_FOLDER_PREFIX}{os.getpid()}-")
        paths = {}
        for key, ref in files_in.items():
            path = Path(self.folder) / f"{key}{Path(getattr(options, key)).suffix}"
            path.write_bytes(ray.get(ref))
            paths[key] = str(path)
        self.options = dataclasses.replace(options, **paths)
        self.out, self.files, self.progress = Path(out), files, progress
        self.stopping = threading.Event()

    def ready(self) -> tuple[int, str]:
        """Up: its pid and its node's id."""
        import ray

        return os.getpid(), ray.get_runtime_context().get_node_id()

    def run(self, stream: Stream, resume: bool, restarts: int, failed_at: float | None) -> tuple[str, object]:
        from deluceva.streams.pool import _run_stream

        self.stopping.clear()
        try:
            summary = _run_stream(stream, resume, restarts, self.options, self.out, self.files,
                                  _Progress(self.progress, self.stopping), failed_at=failed_at)
            return "done", summary
        except KeyboardInterrupt as stop:
            return "interrupted", getattr(stop, "summary", None)
        except DelucevaError as error:
            return "failed", str(error)

    def stop(self) -> None:
        """Stop the stream that runs after its current frame (it writes what it finished)."""
        self.stopping.set()

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _remove_dead_actors_folders(wait_for: Sequence[int] = (), patience: float = 3.0) -> None:
    """The folders of this machine's actors that were killed (SIGKILL, their node stopped)
    before they could remove their own; first waiting up to `patience` seconds for the
    processes `wait_for` (actors just killed) to be gone."""
    deadline = time.monotonic() + patience
    while any(_alive(pid) for pid in wait_for) and time.monotonic() < deadline:
        time.sleep(0.05)
    for folder in Path(tempfile.gettempdir()).glob(f"{ACTOR_FOLDER_PREFIX}*-*"):
        pid = folder.name[len(ACTOR_FOLDER_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Progress:
    """The `events.send` a stream reports through, onto Ray's queue: "start" and "expected" at
    once, "frame" at most every PROGRESS_EVERY seconds. Once the actor is asked to stop, the next
    message (sent after a frame's files are written) raises KeyboardInterrupt in the stream."""

    def __init__(self, queue, stopping: threading.Event):
        self.queue, self.stopping, self.last = queue, stopping, 0.0

    def send(self, message: tuple) -> None:
        if self.stopping.is_set():
            raise KeyboardInterrupt
        now = time.monotonic()
        if message[0] == "frame" and now - self.last < PROGRESS_EVERY:
            return
        self.last = now
        self.queue.put_nowait(message)
