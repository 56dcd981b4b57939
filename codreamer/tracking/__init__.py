"""W&B runs and Weave traces: which mode a run records in, and never a hang, a prompt or a crash.

Modes (from `--no-wandb`, `WANDB_MODE` / `--wandb-mode` and `WANDB_API_KEY`):

| settings                                       | mode     | W&B run                            | Weave  |
|------------------------------------------------|----------|------------------------------------|--------|
| `--no-wandb`, or `WANDB_MODE=disabled`          | disabled | none                               | off    |
| `WANDB_MODE=offline`                            | offline  | `<run_dir>/wandb/offline-run-*`    | off    |
| no key, `WANDB_MODE` unset                      | offline  | same                               | off    |
| no key, `WANDB_MODE=online`                     | offline  | same, with a warning               | off    |
| key, `WANDB_MODE` unset or `online`             | online   | `<run_dir>/wandb/run-*` + server   | on     |
| key, but W&B unreachable or slower than timeout | offline  | same as offline, with a warning    | off    |

Decisions, and why:
- Without a key the default is **offline**, not disabled: an offline run costs about a second,
  touches no network (`WANDB_ERROR_REPORTING=false` is set, so not even wandb's Sentry), and
  `wandb sync <run_dir>/wandb/offline-run-*` uploads it later; nothing of the run is lost.
  Online without a key degrades to offline for the same reason, and never prompts.
- Weave needs its server: it is started only online, after the W&B run is up, with Weave's
  write-ahead log on (`WEAVE_ENABLE_WAL`): each call is written to `~/.weave/wal/<entity>/
  <project>/<key hash>/` before it is sent, and the next online process with the same key
  replays what a crashed one left. Records the sender handed over before a network drop are
  retried by Weave's batcher and then kept in its `.weave_client_dropped_items_log.jsonl`
  (in the working directory). `weave.init` runs in a thread bounded by `tracking_timeout_s`;
  past it `WEAVE_DISABLED` is set, so every op stays a plain call even if Weave comes up late.
- Tracking is started once per run, by the run lifecycle (`codreamer.pipeline.run.open_run`),
  before the loop's first op, so the Weave tree starts at the loop itself.
- Every op's inputs and outputs go through `compact_inputs` / `compact_payload`: token ids,
  logprobs and long numeric lists never reach a trace, strings are capped, secrets masked.
- The W&B run id is derived from the CoDreamer project and run id (`wandb_run_id`) with
  `resume="allow"`, so a resumed run continues the same W&B run (offline segments of one run
  are synced in start order by `wandb sync`). Its files live in `<run_dir>/wandb`.
- W&B records no secret: the settings in its config exclude them, secrets are refused as
  flags (so never in `sys.argv`), and the run collects no system metadata (`x_disable_meta`:
  command line, host, program) and no code; wandb does not record the environment.
- In every mode the run directory keeps the readable record: `iterations.jsonl`,
  `trace.jsonl` (`codreamer.local_trace`, which Weave cannot replace: it has no local-only
  mode) and the failures; `tracking.jsonl` says where each session's W&B data went.

The package, by concern: `modes` (the table above), `payloads` (what reaches W&B and a
trace), `clients` (`WandbClient` / `WeaveClient`, the boundary to the two libraries that tests
replace with recording doubles), `process` (the process-wide switches and open sessions),
`session` (`TrackingSession`, what the loop calls) and `start` (`init_tracking`). ART's
`model.log` starts a W&B run of its own whenever `WANDB_API_KEY` is in the environment: create
the model with `report_metrics=[]` so that runs are ours alone.
"""

from __future__ import annotations

from codreamer.tracking.clients import WandbClient, WandbLibrary, WeaveClient, WeaveLibrary
from codreamer.tracking.modes import Mode, ModeDecision, choose_mode, wandb_run_id
from codreamer.tracking.payloads import art_metrics, compact_inputs, compact_payload, metrics_for_wandb
from codreamer.tracking.session import WANDB_SUBDIR, TrackingSession, disabled_session
from codreamer.tracking.start import TRACKING_FILE, init_tracking, weave_project_name

__all__ = [
    "TRACKING_FILE",
    "WANDB_SUBDIR",
    "Mode",
    "ModeDecision",
    "TrackingSession",
    "WandbClient",
    "WandbLibrary",
    "WeaveClient",
    "WeaveLibrary",
    "art_metrics",
    "choose_mode",
    "compact_inputs",
    "compact_payload",
    "disabled_session",
    "init_tracking",
    "metrics_for_wandb",
    "wandb_run_id",
    "weave_project_name",
]
