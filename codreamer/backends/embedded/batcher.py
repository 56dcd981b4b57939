"""Micro-batching of concurrent sampling requests.

Rollouts run concurrently, so many chat requests arrive within milliseconds of each
other. Sampling them one by one would leave the CPU's matrix units mostly idle; this
collects requests that share sampling settings for a short window and samples them as
one left-padded batch in a worker thread, then hands each caller its own completions.

A caller that goes away (its request task is cancelled: the client disconnected or timed out)
cancels its future; such entries are dropped before sampling and never take a batch slot, so
the model does not generate for requests nobody waits for while their retries queue up.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio.to_thread
from loguru import logger

from codreamer.backends.embedded.policy import AdapterState, Policy, Sample, StopCheck


@dataclass(frozen=True)
class SampleOptions:
    """Per-request sampling options beyond length and temperature; requests batch together only
    when these are equal (`stop_check` is derived from `stop`, so it is not compared)."""

    top_logprobs: int = 0
    stop: tuple[str, ...] = ()
    version: int | None = None  # the policy step asked for (`name@step`); None: the current one
    stop_check: StopCheck | None = field(default=None, compare=False, hash=False)


@dataclass
class _Request:
    prompt_ids: list[int]
    n: int
    max_new_tokens: int
    temperature: float
    seed: int | None
    future: asyncio.Future[list[Sample]] = field(repr=False)
    options: SampleOptions = field(default_factory=SampleOptions)

    @property
    def key(self) -> tuple[int, float, SampleOptions]:
        return self.max_new_tokens, self.temperature, self.options


class SamplingBatcher:
    """Queue in front of `Policy.sample`; one batch runs at a time."""

    def __init__(
        self,
        policy: Policy,
        max_batch: int = 16,
        window_s: float = 0.01,
        adapter_loader: Callable[[int], AdapterState] | None = None,
    ) -> None:
        self.policy = policy
        self.adapter_loader = adapter_loader
        self.max_batch = max_batch
        self.window_s = window_s
        self._queue: asyncio.Queue[_Request] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None
        self.skipped = 0  # requests dropped unsampled because their caller had gone

    def start(self) -> None:
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._run(), name="sampling-batcher")

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None

    async def sample(
        self,
        prompt_ids: list[int],
        n: int,
        max_new_tokens: int,
        temperature: float,
        seed: int | None,
        options: SampleOptions | None = None,
    ) -> list[Sample]:
        future: asyncio.Future[list[Sample]] = asyncio.get_running_loop().create_future()
        await self._queue.put(
            _Request(prompt_ids, n, max_new_tokens, temperature, seed, future, options or SampleOptions())
        )
        try:
            return await future
        finally:
            future.cancel()  # cancelled caller: the entry is skipped (a no-op once the result is set)

    async def _run(self) -> None:
        while True:
            first = await self._queue.get()
            if self._gone(first):
                continue
            batch = await self._collect(first)
            await self._sample_batch(batch)

    def _gone(self, request: _Request) -> bool:
        """Its caller was cancelled (or got its answer): count it and leave it out."""
        if request.future.done():
            self.skipped += 1
            return True
        return False

    async def _collect(self, first: _Request) -> list[_Request]:
        """Gather requests with the same settings as `first` for up to `window_s`."""
        batch, rows, deferred = [first], first.n, []
        deadline = asyncio.get_running_loop().time() + self.window_s
        while rows < self.max_batch:
            timeout = deadline - asyncio.get_running_loop().time()
            if timeout <= 0:
                break
            try:
                request = await asyncio.wait_for(self._queue.get(), timeout)
            except TimeoutError:
                break
            if self._gone(request):
                continue
            if request.key == first.key and rows + request.n <= self.max_batch:
                batch.append(request)
                rows += request.n
            else:
                deferred.append(request)
        for request in deferred:
            self._queue.put_nowait(request)
        return batch

    async def _sample_batch(self, batch: list[_Request]) -> None:
        live = [r for r in batch if not self._gone(r)]  # a caller may have gone while the batch filled
        if not live:
            return
        if len(live) < len(batch):
            logger.debug("sampling batch: {} request(s) dropped, their callers are gone", len(batch) - len(live))
        prompts = [r.prompt_ids for r in live for _ in range(r.n)]
        seeds = [None if r.seed is None else r.seed + k for r in live for k in range(r.n)]
        first = live[0]
        try:
            options = first.options
            samples = await anyio.to_thread.run_sync(
                functools.partial(
                    self.policy.sample,
                    prompts,
                    first.max_new_tokens,
                    first.temperature,
                    seeds,
                    top_logprobs=options.top_logprobs,
                    stop_check=options.stop_check,
                    version=options.version,
                    adapter_loader=self.adapter_loader,
                )
            )
        except Exception as exc:  # noqa: BLE001 - any sampling error goes to the callers; the worker keeps serving
            logger.exception("sampling failed for a batch of {} prompts", len(prompts))
            for request in live:
                if not request.future.done():
                    request.future.set_exception(exc)
            return
        offset = 0
        for request in live:
            if not request.future.done():
                request.future.set_result(samples[offset : offset + request.n])
            offset += request.n
