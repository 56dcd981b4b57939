"""The failure layer: collect every failed attempt of a run, analyse it, report on it.

- `categories`: `FailureCategory` and the categorisation rules;
- `collector`: `FailureCollector` (failures.jsonl + failures/<scenario_id>/ per run);
- `analyzer`: `FailureAnalyzer` (per run, across runs, Markdown, optional LLM judge);
- `charts`: stacked bar chart of categories over iterations;
- `commands`: `cmd_analyze` for the CLI.

Submodules are imported on use (`from codreamer.analysis.collector import FailureCollector`),
so importing the package stays cheap.
"""
