"""How deluceva configures every onnxruntime session: the dense segments, the reference and
keyframe sessions, the profiler's and the probes' all come from `inference_session`, so that they
run as the baseline does (same threads, inter-op 1, default graph optimisation)."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort

__all__ = ["session_options", "inference_session", "shared_arena_options"]


def session_options(threads: int, log_level: int = 3, spinning: bool = False) -> ort.SessionOptions:
    """`threads` intra-op threads, one inter-op thread, sequential execution, quiet logging
    (`log_level` 3: errors only; 4: nothing, for a probe whose failure deluceva reports itself).

    spinning: onnxruntime's default lets a pool's threads spin after each run, waiting for the
    next; deluceva's sessions run one after another within a frame, and each pool's spinning
    took the cores the next one needed (YOLOX-nano at 2 threads on 2 cores: two sessions
    interleaved ran at 15.5 ms a frame each against 6.9 alone; without spinning, 10.8). Off for
    deluceva's own sessions; the plain onnxruntime baseline keeps the default, as users run it.
    With one thread there is no pool, and it changes nothing.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = log_level
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return options


_SHARED_ARENA = []


def shared_arena_options(threads: int, memory_pattern: bool = True, spinning: bool = False):
    """Session options that take memory from one arena for the whole process (a run's dense
    segments and forms, keyframe, reference and calibration sessions).

    A step's intermediates (its NCHW input and output, onnxruntime's blocked copies) are
    megabytes on high-resolution layers. With an arena per session they would stay allocated
    for every step of the model (gigabytes on a 1280x736 detector); without one, each call
    maps and faults in fresh pages (P-Net at 1280x720 ran 1.5x slower). One arena shared by
    every session holds what the largest run needs, once.

    memory_pattern: False for the whole-model sessions that run rarely (keyframes, references,
    calibration) and the dense forms: each tensor then gets its own block, as on a session's
    first run. With memory patterns, the second run asks for one block the size of all of
    them, which the first run's blocks (each its own region: the arena grows by what is asked)
    cannot hold: a second keyframe of YuNet at 1280x736 grew the arena by 166 MiB, and the
    dense forms' blocks another 30 MiB (at the same speed without). The dense segments, which
    run every frame, keep their patterns (without, P-Net's all-dense plan ran 9% slower), and
    so does the whole-model session where an all-dense plan answers frames with it
    (`Executor._plain_session`).
    """
    if not _SHARED_ARENA:
        info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        # Grown by what is asked, not by powers of two (which left half of a 1280x736 model's
        # largest block unused).
        ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, 1, -1, -1))
        _SHARED_ARENA.append(info)
    options = session_options(threads, spinning=spinning)
    options.add_session_config_entry("session.use_env_allocators", "1")
    options.enable_mem_pattern = memory_pattern
    return options


def inference_session(model, threads: int = 1, *, arena: bool = True, log_level: int = 3,
                      options: ort.SessionOptions | None = None, shared_arena: bool = False,
                      memory_pattern: bool = True, spinning: bool = False) -> ort.InferenceSession:
    """An onnxruntime CPU session on `model` (a path, serialised bytes or an onnx.ModelProto).

    Args:
        arena: keep onnxruntime's memory arena; without it a session returns its outputs'
            memory after each run (for sessions that run rarely and output much).
        options: session options to use as they are (instead of `session_options(threads)`).
        shared_arena: take memory from the process's one shared arena (`shared_arena_options`,
            which says when `memory_pattern` is False).
        spinning: let the thread pool spin between runs (onnxruntime's default; see
            `session_options`): only for the plain onnxruntime baseline.
    """
    if options is None and shared_arena:
        options = shared_arena_options(threads, memory_pattern, spinning)
    if options is None:
        options = session_options(threads, log_level, spinning)
        options.enable_cpu_mem_arena = arena
    if hasattr(model, "SerializeToString"):
        model = model.SerializeToString()
    elif isinstance(model, Path):
        model = str(model)
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
