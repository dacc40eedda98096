"""The load generator of ``benchmarks/serving.py``: multimodal requests, a streaming client
for SGLang's native ``POST /generate``, a closed-loop runner and a background sampler of the
server's load.

Every request carries its own image (a grid of random colours, seeded by a counter), so no
two requests of a run share image tokens and the radix cache cannot favour one policy: only
the chat template's text before the image is shared.

``/generate`` with ``"stream": true`` answers server-sent events, one ``data: {json}`` line
per output step with the text so far and ``meta_info`` (``completion_tokens`` counts the
tokens so far), then ``data: [DONE]``. The last event's ``meta_info`` carries
``num_retractions``, ``queue_time`` (with ``--enable-metrics``) and bacon-sglang's
``kv_compression`` report.

Load is read from ``GET /v1/loads?include=core,queues``: a snapshot the scheduler publishes
after every prefill and every few decode steps (``num_used_tokens`` is ``total - available -
evictable``, the same count as bacon-sglang's ``bacon_kv``). It is read from shared memory by
the HTTP process, without a round trip to the scheduler: about 2 ms a call on CPU, against
about 14 ms for ``/server_info``, which asks the scheduler and serialises every server
argument. ``/server_info``'s ``bacon_kv`` is sampled at a lower rate as the cross-check.
"""

from __future__ import annotations

import json
import queue
import random
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import requests
from PIL import Image, ImageDraw

from bacon_sglang.demo import image_data_url, kv_memory


def grid_image(size: int, seed: int) -> Image.Image:
    """A ``size`` x ``size`` picture of 8 x 8 cells of random colours and shapes."""
    rng = random.Random(seed)
    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    step = size // 8
    for r in range(8):
        for c in range(8):
            box = [c * step + 4, r * step + 4, (c + 1) * step - 4, (r + 1) * step - 4]
            colour = tuple(rng.randrange(256) for _ in range(3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    return img


@dataclass
class Workload:
    """Builds ``/generate`` bodies: a chat prompt with one image, fixed output length."""

    prompt: str  # the model's chat template around one image and the question
    image_size: int
    output_tokens: int
    seed: int = 0

    def bodies(
        self, n: int, image_size: int | None = None, override: dict | None = None
    ) -> list[dict]:
        """``n`` request bodies, each with a new image (images are made now, off the clock);
        ``override``: a per-request ``kv_compression`` (e.g. ``{"policy": "none"}``)."""
        size = image_size or self.image_size
        out = []
        for _ in range(n):
            self.seed += 1
            sampling = {"max_new_tokens": self.output_tokens, "temperature": 0, "ignore_eos": True}
            if override:
                sampling["custom_params"] = {"kv_compression": override}
            body = {"text": self.prompt, "sampling_params": sampling, "stream": True}
            body["image_data"] = image_data_url(grid_image(size, self.seed))
            out.append(body)
        return out


def chat_prompt(model_path: str, question: str) -> str:
    """The model's own chat template around one image and ``question``."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_path)
    content = [{"type": "image"}, {"type": "text", "text": question}]
    return processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True
    )


@dataclass
class RequestResult:
    """One streamed request: client-side timings and the server's final ``meta_info``."""

    start: float  # perf_counter() when sent
    end: float = 0.0
    ttft: float = 0.0  # seconds to the first output token
    itl: list[float] = field(default_factory=list)  # seconds between output tokens
    meta: dict = field(default_factory=dict)
    text: str = ""  # the generated text
    error: str | None = None

    @property
    def output_tokens(self) -> int:
        return int(self.meta.get("completion_tokens", 0))


def events(reply: requests.Response) -> Iterator[dict]:
    """The JSON payloads of a ``/generate`` server-sent-event stream."""
    for line in reply.iter_lines():
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        yield json.loads(line[6:])


def send(session: requests.Session, base_url: str, body: dict) -> RequestResult:
    """POST one streaming request; time its first token and the gaps between tokens (a
    chunk carrying k tokens counts as k gaps of 1/k of its delay)."""
    result = RequestResult(start=time.perf_counter())
    last_time, last_tokens = result.start, 0
    try:
        with session.post(base_url + "/generate", json=body, stream=True, timeout=1800) as reply:
            reply.raise_for_status()
            for event in events(reply):
                if "error" in event:
                    raise RuntimeError(event["error"])
                now, tokens = time.perf_counter(), event["meta_info"]["completion_tokens"]
                if tokens > last_tokens:
                    if last_tokens == 0:
                        result.ttft = now - result.start
                    else:
                        result.itl += [(now - last_time) / (tokens - last_tokens)] * (
                            tokens - last_tokens
                        )
                    last_time, last_tokens = now, tokens
                result.meta = event["meta_info"]
                result.text = event.get("text", result.text)
    except (requests.RequestException, RuntimeError) as exc:
        result.error = str(exc)
    result.end = time.perf_counter()
    return result


def run_closed_loop(base_url: str, bodies: list[dict], concurrency: int) -> list[RequestResult]:
    """Send ``bodies`` from ``concurrency`` threads, each sending its next request as soon as
    its previous one finished; returns the results in completion order."""
    todo: queue.Queue[dict] = queue.Queue()
    for body in bodies:
        todo.put(body)
    results: list[RequestResult] = []
    lock = threading.Lock()

    def worker() -> None:
        with requests.Session() as session:
            while True:
                try:
                    body = todo.get_nowait()
                except queue.Empty:
                    return
                result = send(session, base_url, body)
                with lock:
                    results.append(result)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def run_open_loop(
    base_url: str, bodies: list[dict], rate: float, seed: int = 0
) -> list[RequestResult]:
    """Send ``bodies`` at Poisson arrivals of ``rate`` requests/s, each on its own thread
    whatever the number in flight (SGLang queues what it cannot admit); returns the results
    in completion order."""
    rng = random.Random(seed)
    results: list[RequestResult] = []
    lock = threading.Lock()

    def one(body: dict) -> None:
        with requests.Session() as session:
            result = send(session, base_url, body)
        with lock:
            results.append(result)

    threads, start, due = [], time.perf_counter(), 0.0
    for body in bodies:
        due += rng.expovariate(rate)
        time.sleep(max(0.0, start + due - time.perf_counter()))
        threads.append(threading.Thread(target=one, args=(body,), daemon=True))
        threads[-1].start()
    for t in threads:
        t.join()
    return results


def loads(base_url: str | Sequence[str]) -> dict:
    """The scheduler's published load snapshot (``GET /v1/loads``, dp rank 0); for several
    servers (``--workers``), their numbers summed."""
    urls = [base_url] if isinstance(base_url, str) else list(base_url)
    snapshots = [
        requests.get(url + "/v1/loads?include=core,queues", timeout=30).json()["loads"][0]
        for url in urls
    ]
    return summed(snapshots)


def summed(records: list[dict]) -> dict:
    """One record: numbers summed over ``records``, lists of numbers summed element-wise,
    anything else taken from the first (a single record comes back as it is)."""
    if len(records) == 1:
        return records[0]
    out = dict(records[0])
    for key in records[0]:
        values = [r.get(key) for r in records]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            out[key] = sum(values)
        elif all(isinstance(v, list) for v in values) and all(
            isinstance(x, (int, float)) for v in values for x in v
        ):
            out[key] = [sum(xs) for xs in zip(*values, strict=True)]
    return out


def kv_memory_of(base_url: str | Sequence[str]) -> dict:
    """``bacon_kv`` of one server, or summed over several."""
    urls = [base_url] if isinstance(base_url, str) else list(base_url)
    return summed([kv_memory(url) for url in urls])


class Sampler:
    """Background threads that sample the server's load while a run goes on.

    ``samples``: ``(t, used, running, waiting)`` from ``/v1/loads`` every ``interval`` s;
    ``kv_samples``: ``(t, used)`` from ``/server_info``'s ``bacon_kv`` every ``kv_interval`` s
    (its own thread: the scheduler answers it only between two batches), with
    ``used = total - available - evictable``. ``t`` is seconds since the sampler started."""

    def __init__(
        self, base_url: str | Sequence[str], interval: float = 0.05, kv_interval: float = 0.25
    ):
        self.base_url = base_url
        self.samples: list[tuple[float, int, int, int]] = []
        self.kv_samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._loop, args=(self._sample_loads, interval), daemon=True),
            threading.Thread(target=self._loop, args=(self._sample_kv, kv_interval), daemon=True),
        ]
        self.t0 = 0.0

    def __enter__(self) -> Sampler:
        self.t0 = time.perf_counter()
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()

    def _sample_loads(self) -> None:
        load = loads(self.base_url)
        used, running = load["num_used_tokens"], load["num_running_reqs"]
        t = time.perf_counter() - self.t0
        self.samples.append((t, used, running, load["num_waiting_reqs"]))

    def _sample_kv(self) -> None:
        kv = kv_memory_of(self.base_url)
        used = kv["total"] - kv["available"] - kv["evictable"]
        self.kv_samples.append((time.perf_counter() - self.t0, used))

    def _loop(self, sample, interval: float) -> None:
        while not self._stop.is_set():
            try:
                sample()
            except (requests.RequestException, KeyError, IndexError, ValueError):
                pass  # a missed sample; the run goes on
            self._stop.wait(interval)
