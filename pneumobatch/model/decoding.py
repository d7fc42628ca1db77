"""Reading files into model inputs, in worker processes, and gathering them into batches; no torch.

Both forward paths use what is here: :mod:`pneumobatch.model.inference` (PyTorch: a
DataLoader's workers call :func:`read_entry`) and :mod:`pneumobatch.model.runtime` (ONNX
Runtime: :func:`decode_in_processes`, a process pool). :func:`batched_results` turns decoded
chunks into forward passes of exactly ``batch_size`` images and one
:class:`~pneumobatch.io.results.FileResult` per file, in discovery order, whatever the array
library.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import functools
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections import deque
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import numpy as np

from pneumobatch.core.errors import FileRejected, PneumobatchError, Reason, Status
from pneumobatch.io.discovery import FileEntry, sniff
from pneumobatch.io.readers import ReadOptions, read_image
from pneumobatch.io.results import FileResult
from pneumobatch.model.preprocess import InputSpec, display_image, prepare_image

log = logging.getLogger(__name__)

#: Files one decoding task reads. Small, so that the workers share a folder's slow files
#: evenly (a study's files usually share one encoding, and a whole batch of JPEG-LS or
#: deflated files takes a worker several times as long as one of JPEG) and the first forward
#: pass waits for a few files, not a whole batch; the main process gathers the decoded
#: files into batches of ``batch_size`` for the network.
DECODE_CHUNK = 4


def read_entry(entry: FileEntry, specs: Sequence[InputSpec], options: ReadOptions, index: int = 0) -> dict[str, Any]:
    """Read one file and prepare its inputs (uint8 (1, S, S) per spec); never raises for bad input:
    a file that cannot be used is an item with its status, reason and detail. With
    ``options.display_side``, the item also holds ``display``: the image as read, uint8, aspect
    ratio kept, long side at most that (what a heatmap is laid over)."""
    item: dict[str, Any] = {"index": index, "status": Status.OK, "reason": "", "detail": "", "meta": {}, "inputs": None}
    if entry.problem is not None:
        reason, detail = entry.problem
        item.update(status=reason.status, reason=reason.value, detail=detail)
        return item
    try:
        image = read_image(entry.path, sniff(entry.path), options)
        item["meta"] = image.meta
        item["inputs"] = {s: prepare_image(image, s)[None] for s in specs}
        if options.display_side:
            item["display"] = display_image(image.display_pixels(), options.display_side)
    except FileRejected as exc:
        item.update(status=exc.status, reason=exc.reason.value, detail=exc.detail, meta=exc.meta)
    except PermissionError:
        item.update(status=Status.ERROR, reason=Reason.UNREADABLE.value, detail="permission denied")
    except OSError as exc:
        item.update(
            status=Status.ERROR, reason=Reason.UNREADABLE.value, detail=(exc.strerror or type(exc).__name__)[:200]
        )
    except Exception as exc:  # noqa: BLE001 - one bad file must never stop a night's batch
        log.debug("unexpected error reading %s", entry.path, exc_info=True)
        item.update(status=Status.ERROR, reason=Reason.READ_FAILED.value, detail=f"{type(exc).__name__}: {exc}"[:200])
    return item


def collate(items: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[InputSpec, np.ndarray], list[int]]:
    """A chunk of read items -> (the items without their inputs, stacked inputs by spec, indices of decoded items)."""
    ok = [i for i, item in enumerate(items) if item["inputs"] is not None]
    stacked = {}
    if ok:
        for spec in items[ok[0]]["inputs"]:
            stacked[spec] = np.stack([items[i]["inputs"][spec] for i in ok])
    for item in items:
        item["inputs"] = None
    return items, stacked, ok


#: How often a decoding worker without ``PR_SET_PDEATHSIG`` (not Linux) checks that its parent lives.
PARENT_CHECK_SECONDS = 0.5


def _set_parent_death_signal() -> bool:
    """Linux: the kernel sends this process SIGKILL when its parent dies (``prctl(PR_SET_PDEATHSIG)``)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(1, signal.SIGKILL, 0, 0, 0) == 0  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return False


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(PARENT_CHECK_SECONDS)
    os.kill(os.getpid(), signal.SIGKILL)


def end_with_parent(parent: int, death_signal: bool = True) -> None:
    """End this process (SIGKILL) as soon as ``parent`` dies, whatever it is doing then.

    A main process killed with ``kill -9`` (the OOM killer, a scheduler's timeout,
    ``KillMode=process``) runs no clean-up: its workers would live on as orphans, blocked
    writing into a pipe nobody reads. On Linux the kernel kills them (``PR_SET_PDEATHSIG``),
    elsewhere a thread checks every :data:`PARENT_CHECK_SECONDS`. A parent that died before
    this was set (the worker is an orphan already) ends the worker at once. ``parent`` 0:
    whichever process is the parent now. The kernel's signal comes when the parent *thread*
    that forked this process ends: ``death_signal`` False (forked from another thread than
    the main one, which may end before the run) uses the watching thread instead.
    """
    parent = parent or os.getppid()
    armed = death_signal and _set_parent_death_signal()
    if os.getppid() != parent:  # died before (or while) the signal was set: it would never come
        os.kill(os.getpid(), signal.SIGKILL)
    if not armed:
        threading.Thread(target=_watch_parent, args=(parent,), name="parent-watch", daemon=True).start()


def worker_parent(context: Optional[Any] = None) -> int:
    """The PID the decoding workers' parent will have: this process, or its forkserver (0: not known)."""
    method = (context or multiprocessing).get_start_method()
    if method == "forkserver":
        from multiprocessing import forkserver

        forkserver.ensure_running()
        pid = getattr(forkserver._forkserver, "_forkserver_pid", None)  # noqa: SLF001 - no public spelling
        return int(pid) if pid else 0
    return os.getpid()


def _decode_worker_init(parent: int, death_signal: bool) -> None:
    # Ctrl-C reaches the whole process group: the main process stops the run and ends the
    # workers, which must not print a KeyboardInterrupt of their own; SIGTERM ends them as usual
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    end_with_parent(parent, death_signal)


def _read_chunk(
    entries: Sequence[FileEntry], first: int, specs: Sequence[InputSpec], options: ReadOptions
) -> tuple[list[dict[str, Any]], dict[InputSpec, np.ndarray], list[int]]:
    return collate([read_entry(e, specs, options, first + i) for i, e in enumerate(entries)])


class DecoderDied(PneumobatchError):
    """A decoding worker process ended without finishing its files (killed, out of memory)."""


def decode_in_processes(
    entries: Sequence[FileEntry],
    specs: Sequence[InputSpec],
    options: ReadOptions,
    *,
    workers: int,
    chunk: int = DECODE_CHUNK,
    in_flight: int = 32,
    started: Callable[[], None] = lambda: None,
) -> Iterator[tuple[list[dict[str, Any]], dict[InputSpec, np.ndarray], list[int]]]:
    """Decoded chunks of ``chunk`` files in order, read by ``workers`` processes (0: this one) with
    about ``in_flight`` files read ahead. Closing the generator (an error, a signal) ends the
    workers at once; they also end with this process if it is killed (:func:`end_with_parent`).
    ``started`` is called once the workers are running, before the first chunk is waited for
    (the models load then, while the workers decode)."""
    specs = sorted(set(specs))
    starts = range(0, len(entries), chunk)
    if not workers:
        started()
        for first in starts:
            yield _read_chunk(entries[first : first + chunk], first, specs, options)
        return
    context = multiprocessing.get_context()
    init = functools.partial(
        _decode_worker_init, worker_parent(context), threading.current_thread() is threading.main_thread()
    )
    pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=context, initializer=init)
    ahead = max(workers, -(-in_flight // chunk))
    pending: deque[concurrent.futures.Future] = deque()
    todo = iter(starts)
    try:
        for first in todo:
            pending.append(pool.submit(_read_chunk, entries[first : first + chunk], first, specs, options))
            if len(pending) >= ahead:
                break
        started()
        while pending:
            try:
                result = pending.popleft().result()
            except concurrent.futures.process.BrokenProcessPool as exc:
                raise DecoderDied(
                    "a decoding worker process ended without finishing its files (killed, or out of memory); "
                    "run again with --resume"
                ) from exc
            first = next(todo, None)
            if first is not None:
                pending.append(pool.submit(_read_chunk, entries[first : first + chunk], first, specs, options))
            yield result
    finally:
        for future in pending:
            future.cancel()
        processes = list((getattr(pool, "_processes", None) or {}).values())  # noqa: SLF001 - no public spelling before 3.14
        for process in processes:
            if process.is_alive():
                process.terminate()
        pool.shutdown(wait=True, cancel_futures=True)


def batched_results(
    chunks: Iterable[tuple[list[dict[str, Any]], dict[InputSpec, np.ndarray], list[int]]],
    entries: Sequence[FileEntry],
    predict: Callable[[dict[InputSpec, Any], dict[str, np.ndarray], dict[str, np.ndarray]], dict[str, np.ndarray]],
    applicable: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
    batch_size: int,
    *,
    to_array: Callable[[np.ndarray], Any] = lambda x: x,
    concat: Callable[[list[Any]], Any] = np.concatenate,
) -> Iterator[FileResult]:
    """One :class:`FileResult` per entry, in order, from decoded chunks; the models see batches of
    exactly ``batch_size`` decoded files (the last one fewer). ``to_array`` turns a chunk's numpy
    inputs into what ``predict`` takes (a tensor on a device) and ``concat`` joins those. ``predict(inputs,
    scores, cams)`` returns probabilities by model and may fill ``scores`` (applicability) and ``cams``
    (Grad-CAM maps of every class, (B, C, h, w)) by model; a result carries its row of each, and its
    ``display`` image when the reader kept one."""
    pending: deque[tuple[dict[str, Any], bool]] = deque()  # (item, decoded), in order, not yet yielded
    gathered: dict[InputSpec, list[Any]] = {}  # spec -> decoded inputs of the pending items, in order
    rows = 0

    def forward(n: int) -> Iterator[FileResult]:
        """Run the first ``n`` gathered rows; yield the pending items up to the last of them."""
        nonlocal gathered, rows
        inputs = {spec: concat(parts) for spec, parts in gathered.items()}
        scores: dict[str, np.ndarray] = {}
        cams: dict[str, np.ndarray] = {}
        probs = predict({spec: x[:n] for spec, x in inputs.items()}, scores, cams) if n else {}
        flags = applicable(scores)
        gathered = {spec: [x[n:]] for spec, x in inputs.items()} if rows > n else {}
        rows -= n
        row = 0
        while pending and (not pending[0][1] or row < n):
            item, decoded = pending.popleft()
            result = FileResult(entries[item["index"]], item["status"], item["reason"], item["detail"], item["meta"])
            result.display = item.get("display")
            if decoded:
                result.probs = {name: p[row] for name, p in probs.items()}
                result.ood_scores = {name: float(s[row]) for name, s in scores.items()}
                result.applicable = {name: bool(a[row]) for name, a in flags.items()}
                result.cams = {name: c[row] for name, c in cams.items()}
                row += 1
            yield result

    for items, inputs, ok in chunks:
        decoded = set(ok)
        pending.extend((item, i in decoded) for i, item in enumerate(items))
        for spec, x in inputs.items():
            gathered.setdefault(spec, []).append(to_array(x))
        rows += len(ok)
        while rows >= batch_size:
            yield from forward(batch_size)
    yield from forward(rows)
