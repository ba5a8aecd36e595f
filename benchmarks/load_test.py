"""Many visitors at once: drive the demo through gradio_client and check every answer.

Usage::

    python benchmarks/load_test.py [--sessions 20] [--seconds 120] [--methods dense-clip,ldvc]
        [--max-sessions 64] [--concurrency 1] [--url http://127.0.0.1:7860/]

Each simulated visitor is its own Gradio session (its own ``gradio_client.Client``) with its own
ToyWorld scene and its own vocabulary, and calls ``/segment`` again and again until the time is
up. Every answer is checked against what the visitor's own inputs give when run alone, outside
the server, through the same :class:`~ovseg.demo.session.Session` code: a request that fails, or
an answer that belongs to another visitor's image or vocabulary (cross-talk), is counted and
shown. Without ``--url`` the demo is served in this process on 127.0.0.1 with the shipped
weights, so its memory (resident set size) and its scratch folders are measured too.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

import ovseg
from ovseg.demo.examples import PRESET_CUSTOM

METHOD_DEFAULT_SIZE = "each method's own"
# What every simulated visitor sends besides its image, vocabulary and methods.
OPACITY, DPSEG_PASS, THETA, ESC_PROMPTS, LDVC_TOP_M = 0.5, "II", 0.5, ["point"], 16
AREA_TOLERANCE = 1e-3


@dataclass
class Visitor:
    """One simulated visitor: an image file, a vocabulary and the answer they should get.

    Attributes:
        expected: method → ``[(class name, area), ...]`` computed outside the server.
    """

    index: int
    image: Path
    vocabulary: str
    expected: dict[str, list[tuple[str, float]]] = field(default_factory=dict)


@dataclass
class LoadResult:
    """What a load run measured."""

    sessions: int
    seconds: float
    latencies: list[float] = field(default_factory=list)
    answers_per_visitor: dict[int, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)
    rss_mb: list[tuple[float, float]] = field(default_factory=list)  # (seconds since start, MB)
    rss_after_first_round_mb: float | None = None
    session_folders_max: int = 0
    session_folders_end: int | None = None

    @property
    def requests(self) -> int:
        return len(self.latencies)

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) if self.latencies else float("nan")


def resident_mb() -> float:
    """This process's resident set size in MB (Linux ``/proc``; peak RSS elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_visitors(count: int, folder: Path, *, seed: int = 0) -> list[Visitor]:
    """``count`` visitors, each with a different ToyWorld scene and vocabulary."""
    from ovseg.data.toyworld import ToyWorld

    world = ToyWorld(image_size=128)
    rng = np.random.default_rng(seed)
    visitors = []
    for index in range(count):
        scene = world.scene(10_000 + seed * 1000 + index)
        present = [world.class_names[c] for c in np.unique(scene.labels)]
        distractors = rng.choice(world.class_names, size=2, replace=False).tolist()
        names = list(dict.fromkeys(present + distractors))
        rng.shuffle(names)
        path = folder / f"visitor-{index}.png"
        Image.fromarray(scene.image).save(path)
        visitors.append(Visitor(index, path, ", ".join(names)))
    return visitors


def expected_answers(visitors: list[Visitor], models: dict, methods: list[str]) -> None:
    """Fill each visitor's expected areas by running their inputs alone through a Session."""
    from ovseg.demo.app import run_options
    from ovseg.demo.session import Session

    options = run_options(METHOD_DEFAULT_SIZE, DPSEG_PASS, THETA, ESC_PROMPTS, LDVC_TOP_M)
    for visitor in visitors:
        session = Session.create({name: models[name] for name in methods})
        session.set_image(str(visitor.image))
        vocabulary = ovseg.parse_vocabulary(visitor.vocabulary)
        for name in methods:
            prediction = session.run(name, vocabulary, options).prediction
            visitor.expected[name] = _areas(prediction.summary()["classes"])
        session.close()


def _areas(classes: list[dict]) -> list[tuple[str, float]]:
    return sorted((c["name"], float(c["area"])) for c in classes)


def check_answer(visitor: Visitor, files: list[str]) -> str | None:
    """None if the answer's JSON matches the visitor's expected areas, else what differs."""
    summary_path = next((f for f in files if str(f).endswith("ovseg-results.json")), None)
    if summary_path is None:
        return f"visitor {visitor.index}: no ovseg-results.json among {files}"
    summary = json.loads(Path(summary_path).read_text(encoding="utf-8"))
    vocabulary = [names[0] for names in summary["vocabulary"]]
    if vocabulary != list(ovseg.parse_vocabulary(visitor.vocabulary).names):
        return f"visitor {visitor.index}: got the vocabulary {vocabulary}"
    for name, expected in visitor.expected.items():
        got = _areas(summary["methods"].get(name, {}).get("classes", []))
        same = [a for a, _ in got] == [a for a, _ in expected] and all(
            abs(x - y) <= AREA_TOLERANCE for (_, x), (_, y) in zip(got, expected, strict=True)
        )
        if not same:
            return f"visitor {visitor.index}, {name}: got {got[:4]}..., expected {expected[:4]}..."
    return None


def serve(methods: list[str], *, concurrency: int, max_sessions: int):
    """The demo with the shipped weights of ``methods``, served on 127.0.0.1 in this process."""
    from ovseg.demo.app import build_demo
    from ovseg.demo.settings import DemoSettings, load_methods

    loaded = load_methods(DemoSettings(methods=methods, concurrency=concurrency))
    missing = [name for name in methods if name not in loaded.methods]
    if missing:
        raise SystemExit(f"could not load {missing}: {loaded.status}")
    demo = build_demo(loaded.methods, loaded.status, concurrency=concurrency)
    demo.queue(default_concurrency_limit=concurrency)
    _, url, _ = demo.launch(
        prevent_thread_lock=True,
        server_name="127.0.0.1",
        quiet=True,
        state_session_capacity=max_sessions,
    )
    return demo, url, loaded.methods


def drive(
    url: str,
    visitors: list[Visitor],
    methods: list[str],
    seconds: float,
    *,
    scratch_root: Path | None = None,
) -> LoadResult:
    """All visitors at once for ``seconds`` (each finishes the request it started)."""
    from gradio_client import Client, handle_file

    result = LoadResult(sessions=len(visitors), seconds=seconds)
    result.answers_per_visitor = {v.index: 0 for v in visitors}
    lock = threading.Lock()
    start = time.perf_counter()
    deadline = start + seconds
    first_round = threading.Barrier(len(visitors) + 1)
    done = threading.Event()

    def visit(visitor: Visitor) -> None:
        downloads = tempfile.mkdtemp(prefix=f"ovseg-load-{visitor.index}-")
        try:
            client = Client(url, verbose=False, download_files=downloads)
        except Exception as error:
            with lock:
                result.failures.append(f"visitor {visitor.index}: connect: {error!r}")
            first_round.abort()
            return
        first = True
        while first or time.perf_counter() < deadline:
            began = time.perf_counter()
            try:
                answer = client.predict(
                    handle_file(str(visitor.image)),
                    visitor.vocabulary,
                    PRESET_CUSTOM,
                    methods,
                    METHOD_DEFAULT_SIZE,
                    OPACITY,
                    DPSEG_PASS,
                    THETA,
                    ESC_PROMPTS,
                    LDVC_TOP_M,
                    api_name="/segment",
                )
                problem = check_answer(visitor, answer[4])
            except Exception as error:
                problem, answer = None, None
                with lock:
                    result.failures.append(f"visitor {visitor.index}: {error!r}")
            elapsed = time.perf_counter() - began
            with lock:
                if answer is not None:
                    result.latencies.append(elapsed)
                    result.answers_per_visitor[visitor.index] += 1
                if problem:
                    result.mismatches.append(problem)
            if first:
                first = False
                with contextlib.suppress(threading.BrokenBarrierError):
                    first_round.wait()
        client.close()

    def sample() -> None:
        while not done.wait(0.5):
            with lock:
                result.rss_mb.append((time.perf_counter() - start, resident_mb()))
                if scratch_root is not None:
                    result.session_folders_max = max(
                        result.session_folders_max, _session_folders(scratch_root)
                    )

    threads = [threading.Thread(target=visit, args=(v,), daemon=True) for v in visitors]
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    for thread in threads:
        thread.start()
    try:
        first_round.wait()
        gc.collect()
        result.rss_after_first_round_mb = resident_mb()
    except threading.BrokenBarrierError:
        pass
    for thread in threads:
        thread.join()
    done.set()
    sampler.join()
    gc.collect()
    result.rss_mb.append((time.perf_counter() - start, resident_mb()))
    if scratch_root is not None:
        result.session_folders_end = _session_folders(scratch_root)
    result.seconds = time.perf_counter() - start
    return result


def _session_folders(root: Path) -> int:
    return sum(1 for _ in root.glob("session-*"))


def report(result: LoadResult, *, methods: list[str], concurrency: int, max_sessions: int) -> str:
    """The run as a markdown table and a few lines."""
    answers = list(result.answers_per_visitor.values())
    rss = [mb for _, mb in result.rss_mb]
    rows = [
        "| sessions | methods | concurrency | max sessions | seconds | requests | failed | "
        "wrong answers | req/s | p50 s | p90 s | p99 s | max s |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {result.sessions} | {', '.join(methods)} | {concurrency} | {max_sessions} | "
        f"{result.seconds:.0f} | {result.requests} | {len(result.failures)} | "
        f"{len(result.mismatches)} | {result.requests / result.seconds:.2f} | "
        f"{result.percentile(50):.2f} | {result.percentile(90):.2f} | "
        f"{result.percentile(99):.2f} | {max(result.latencies, default=float('nan')):.2f} |",
        "",
        f"Answers per session: min {min(answers, default=0)}, median "
        f"{statistics.median(answers) if answers else 0:g}, max {max(answers, default=0)}.",
    ]
    if rss and result.rss_after_first_round_mb is not None:
        halfway = min(result.rss_mb, key=lambda sample: abs(sample[0] - result.seconds / 2))[1]
        rows.append(
            f"Server memory (RSS): {rss[0]:.0f} MB at the start, "
            f"{result.rss_after_first_round_mb:.0f} MB once every session had its first answer, "
            f"{halfway:.0f} MB halfway, {rss[-1]:.0f} MB at the end (peak {max(rss):.0f} MB)."
        )
    if result.session_folders_end is not None:
        rows.append(
            f"Session scratch folders: at most {result.session_folders_max} at once, "
            f"{result.session_folders_end} at the end."
        )
    for problem in (result.failures + result.mismatches)[:10]:
        rows.append(f"- {problem}")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=20, help="simulated visitors at once")
    parser.add_argument("--seconds", type=float, default=120.0, help="how long they keep asking")
    parser.add_argument("--methods", default="dense-clip,ldvc", help="comma-separated methods")
    parser.add_argument(
        "--concurrency", type=int, default=1, help="requests the server runs at once"
    )
    parser.add_argument("--max-sessions", type=int, default=64, help="the server's session cap")
    parser.add_argument("--url", help="an already running demo (default: serve one here)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    methods = [name.strip() for name in args.methods.split(",") if name.strip()]
    folder = Path(tempfile.mkdtemp(prefix="ovseg-load-inputs-"))
    visitors = make_visitors(args.sessions, folder)
    demo = None
    if args.url:
        from ovseg.demo.settings import DemoSettings, load_methods

        url, models = args.url, load_methods(DemoSettings(methods=methods)).methods
    else:
        demo, url, models = serve(
            methods, concurrency=args.concurrency, max_sessions=args.max_sessions
        )
    expected_answers(visitors, models, methods)
    print(
        f"{os.cpu_count()} CPUs; {args.sessions} sessions for {args.seconds:.0f} s against {url}",
        flush=True,
    )
    try:
        result = drive(
            url,
            visitors,
            methods,
            args.seconds,
            scratch_root=None if demo is None else demo.scratch_space.root,
        )
    finally:
        if demo is not None:
            demo.close()
    print(
        report(
            result, methods=methods, concurrency=args.concurrency, max_sessions=args.max_sessions
        )
    )
    if result.failures or result.mismatches:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
