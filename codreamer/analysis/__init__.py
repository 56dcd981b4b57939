"""The failure layer: collect every failed attempt of a run, analyse it, report on it.

Storage:
- `failures`: the `Failure` record and `FailureStore` (failures.jsonl + failures/<scenario_id>/);
- `collector`: `FailureCollector`, which finds the failures of scored groups and stores them;
- `fields`: what a failure keeps of a trajectory or an exception;
- `wandb_log`: the failures as a W&B table and artifact.

Analysis:
- `categories`: `FailureCategory` and the categorisation rules;
- `report`: the report models (one run, across runs, what the judge said);
- `rules`: the rule-based analysis and the recommendations;
- `judge`: the optional LLM judge (`AnalyzerJudgeConfig`, `explain`);
- `markdown`: the reports as Markdown;
- `analyzer`: `FailureAnalyzer`, which reads the runs and ties the above together;
- `charts`: stacked bar chart of categories over iterations;
- `commands`: `cmd_analyze` for the CLI.

Submodules are imported on use (`from codreamer.analysis.collector import FailureCollector`),
so importing the package stays cheap.
"""
