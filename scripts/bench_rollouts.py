"""Rollout concurrency and the orchestrator's own cost per trajectory.

Usage: `uv run python scripts/bench_rollouts.py [--latency-ms 50] [--rollouts 64] [--concurrency N ...]`

A small OpenAI-compatible chat server runs in a separate process (so its CPU time is not
counted as ours) and answers every request after `--latency-ms`: the first turn of an
episode asks for `lookup_company`, the next one calls `finalize_email` with an email that
is different for every request, so every trajectory is distinct. Rollouts go through the
real path: `generate_trajectories` (semaphore-bounded, `art.gather_trajectory_groups`) ->
`rollout` (the OpenAI client, tool execution, trajectory building), inside the local trace
recorder as in a run. Reported:

* for each policy client (`codreamer.agent.policy_client`: "openai" = ART's OpenAI
  client, "direct" = aiohttp without the SDK, the embedded default), alternating: wall time
  of 1 rollout and of `--rollouts` rollouts at each concurrency limit (the default list is
  Settings' `rollout_concurrency` and `--rollouts`), the ratio to one rollout, and the
  ratio direct / openai;
* the orchestrator's CPU time per trajectory, in microseconds: the rollout's client side
  for each client (measured with the server answering at once), scoring with the real `RewardScorer`
  (rubric + seeded simulator + event log append/refresh/read + blend), the history
  record and the trajectories' local trace lines.

Everything runs in a temporary directory; timings are medians over `--repeats`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import socket
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from loguru import logger

WORDS = "freight audit invoices carriers savings team week call quick note".split()


# ------------------------------------------------------------------- the chat server
def _tool_call(name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": f"call_{uuid.uuid4().hex[:12]}",
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(arguments)},
    }


def _reply(body: dict[str, Any], served: int) -> dict[str, Any]:
    """lookup_company first; once a tool result is in the conversation, finalize_email."""
    messages = body.get("messages", [])
    if any(m.get("role") == "tool" for m in messages):
        words = " ".join(WORDS[(served + i) % len(WORDS)] for i in range(12))
        call = _tool_call(
            "finalize_email",
            {
                "subject": f"Invoice audits, note {served}",
                "body": f"Hi there, {words}. A 15-minute call next week? Sam",
            },
        )
    else:
        call = _tool_call("lookup_company", {})
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model", "bench"),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": None, "tool_calls": [call]},
                "finish_reason": "tool_calls",
                "logprobs": None,
            }
        ],
        "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120},
    }


def _serve(port: int, ready: Any, latency: Any, usage: Any) -> None:
    """Server process: aiohttp app; `latency` is a shared double, changed between phases;
    `usage` holds [calls served, this process's CPU seconds so far] (the server's own cost)."""
    from aiohttp import web

    served = 0

    async def chat(request: web.Request) -> web.Response:
        nonlocal served
        body = await request.json()
        served += 1
        if latency.value > 0:
            await asyncio.sleep(latency.value)
        response = web.json_response(_reply(body, served))
        usage[0], usage[1] = served, time.process_time()
        return response

    async def main() -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", chat)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
        ready.set()
        await asyncio.Event().wait()

    asyncio.run(main())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ------------------------------------------------------------------------- measuring
async def timed(action: Callable[[], Awaitable[Any]]) -> tuple[float, float, Any]:
    """(wall s, this process's CPU s, result) of one awaited call."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = await action()
    return time.perf_counter() - wall, time.process_time() - cpu, result


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


class CallTimer:
    """Counts calls of one function and their CPU time (to attribute the rollout's own cost)."""

    def __init__(self, module: Any, name: str) -> None:
        self.module, self.name = module, name
        self.original = getattr(module, name)
        self.calls, self.cpu_s = 0, 0.0

    def __enter__(self) -> CallTimer:
        def timed_call(*args: Any, **kwargs: Any) -> Any:
            started = time.process_time()
            try:
                return self.original(*args, **kwargs)
            finally:
                self.calls += 1
                self.cpu_s += time.process_time() - started

        setattr(self.module, self.name, timed_call)
        return self

    def __exit__(self, *exc: object) -> None:
        setattr(self.module, self.name, self.original)


async def run(args: argparse.Namespace) -> None:
    import art

    import codreamer.agent.rollout as rollout_module
    from codreamer.agent.rollout import RolloutConfig
    from codreamer.config import InferenceClientKind, Settings
    from codreamer.data import load_task_data
    from codreamer.local_trace import recording_to
    from codreamer.pipeline.history import append_record
    from codreamer.pipeline.run import build_scorer
    from codreamer.pipeline.stages import RolloutPlan, generate_trajectories, score_trajectories

    work = Path(tempfile.mkdtemp(prefix="bench-rollouts-"))
    settings = Settings(runs_dir=work, wandb=False, outcomes="simulator")
    task = load_task_data(settings.data_dir)
    group_size = settings.group_size
    scenarios = [task.train[i % len(task.train)] for i in range(max(1, args.rollouts // group_size))]
    rollouts = len(scenarios) * group_size
    concurrencies = args.concurrency or sorted({settings.rollout_concurrency, rollouts})
    kinds: tuple[InferenceClientKind, ...] = ("openai", "direct")

    latency = mp.get_context("spawn").Value("d", args.latency_ms / 1000)
    ready = mp.get_context("spawn").Event()
    port = _free_port()
    usage = mp.get_context("spawn").Array("d", 2)
    server = mp.get_context("spawn").Process(target=_serve, args=(port, ready, latency, usage), daemon=True)
    server.start()
    if not ready.wait(30):
        raise RuntimeError("the bench chat server did not start")
    model = art.Model(
        name="bench",
        project="bench",
        inference_base_url=f"http://127.0.0.1:{port}/v1",
        inference_api_key="x",
        inference_model_name="bench",
    )

    def plan(kind: InferenceClientKind, size: int, concurrency: int) -> RolloutPlan:
        config = RolloutConfig.from_settings(settings).model_copy(update={"inference_client": kind})
        return RolloutPlan(task.product, config, size, concurrency, settings.max_exceptions, settings.seed)

    step = 0

    async def generate(
        kind: InferenceClientKind, which: list[Any], size: int, concurrency: int
    ) -> list[art.TrajectoryGroup]:
        nonlocal step
        step += 1
        groups = await generate_trajectories(model, which, plan(kind, size, concurrency), step=step, pbar_desc=None)
        failed = sum(len(g.exceptions) for g in groups)
        if failed:
            raise RuntimeError(f"{failed} rollouts failed with the {kind} client; see the log")
        return groups

    single: dict[str, list[float]] = {kind: [] for kind in kinds}
    many: dict[tuple[str, int], list[float]] = {(kind, c): [] for kind in kinds for c in concurrencies}
    client_cpu: dict[str, list[float]] = {kind: [] for kind in kinds}
    server_cpu: list[float] = []
    messages_cpu, scoring_cpu, history_cpu = [], [], []
    try:
        with recording_to(work):
            for kind in kinds:  # warm-up: client, connections, imports
                await generate(kind, scenarios, group_size, max(concurrencies))
            for _ in range(args.repeats):  # the two clients alternate, so a slow spell hits both
                for kind in kinds:
                    single[kind].append((await timed(lambda k=kind: generate(k, scenarios[:1], 1, 1)))[0])
                    for concurrency in concurrencies:
                        wall, _, _ = await timed(lambda k=kind, c=concurrency: generate(k, scenarios, group_size, c))
                        many[kind, concurrency].append(wall)

            latency.value = 0.0  # the orchestrator's own cost: the server answers at once
            scorer = build_scorer(settings, task, online=True)
            for repeat in range(args.repeats):
                for kind in kinds:
                    calls_before, server_before = usage[0], usage[1]
                    with CallTimer(rollout_module, "request_messages") as messages_timer:
                        _, cpu, groups = await timed(
                            lambda k=kind: generate(k, scenarios, group_size, max(concurrencies))
                        )
                    client_cpu[kind].append(cpu / rollouts)
                    server_cpu.append((usage[1] - server_before) / max(1.0, usage[0] - calls_before))
                messages_cpu.append(messages_timer.cpu_s / rollouts)
                _, cpu, _ = await timed(
                    lambda g=groups: score_trajectories(g, scenarios, scorer, step=step, emails_sent=True)
                )
                scoring_cpu.append(cpu / rollouts)
                record = {
                    "iteration": repeat + 1,
                    "step": step,
                    "rewards": [t.reward for g in groups for t in g.trajectories],
                }
                started = time.process_time()
                append_record(work / "iterations.jsonl", record)
                history_cpu.append(time.process_time() - started)
    finally:
        server.kill()

    turns = 2
    print(f"\nRollouts against a loopback chat server, {args.latency_ms:.0f} ms per call, {turns} calls per rollout")
    print(f"(medians of {args.repeats}; the two clients alternate; ideal = waves x calls x latency)")
    for kind in kinds:
        one = median(single[kind])
        print(f"  {kind} client: 1 rollout {one * 1e3:.0f} ms (ideal {turns * args.latency_ms:.0f} ms)")
        for concurrency in concurrencies:
            waves = -(-rollouts // concurrency)
            wall = median(many[kind, concurrency])
            print(
                f"    {rollouts} rollouts, concurrency {concurrency}: {wall * 1e3:.0f} ms = {wall / one:.2f} x one rollout "
                f"(ideal {waves * turns * args.latency_ms:.0f} ms)"
            )
    for concurrency in concurrencies:
        ratio = median(many["direct", concurrency]) / median(many["openai", concurrency])
        print(f"  direct / openai at concurrency {concurrency}: {ratio:.2f}")
    print(f"Orchestrator CPU per trajectory ({rollouts} trajectories, server answering at once):")
    for kind in kinds:
        print(
            f"  rollout, {kind} client (prompt, HTTP client, tools, trajectory, trace): {median(client_cpu[kind]) * 1e6:.0f} us"
        )
    print(
        f"    of which request_messages (request messages per turn):                {median(messages_cpu) * 1e6:.0f} us"
    )
    print(
        f"  (not ours: the bench server's CPU per call, on the other core:           {median(server_cpu) * 1e6:.0f} us)"
    )
    print(
        f"  scoring (rubric + simulator + event log + blend):                        {median(scoring_cpu) * 1e6:.0f} us"
    )
    print(
        f"  history record (one per iteration): {median(history_cpu) * 1e6:.0f} us "
        f"= {median(history_cpu) / rollouts * 1e6:.1f} us per trajectory"
    )
    logger.info("bench files in {}", work)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument(
        "--rollouts", type=int, default=64, help="Rollouts of the concurrent run (rounded to whole groups)."
    )
    parser.add_argument("--concurrency", type=int, nargs="*", help="Limits to try (default: Settings' and --rollouts).")
    parser.add_argument("--repeats", type=int, default=5)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    from codreamer.log import configure_logging

    configure_logging(level="WARNING")
    os.environ.setdefault("TQDM_DISABLE", "1")  # ART's gather always draws a progress bar
    asyncio.run(run(parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
