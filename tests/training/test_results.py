"""Results files: the markdown table (percentages, skipped cells, paper columns) and results.json."""

import importlib.util
import json

import ml_collections

from mamba_jax.training import results

ROWS = [
    {"model": "Mamba", "accuracy@64": 1.0, "accuracy@128": 0.5, "paper": {"accuracy@64": 1.0}},
    {"model": "MHA-Abs", "accuracy@64": 0.25, "accuracy@128": None, "paper": {}},
]


def test_markdown_table():
  table = results.markdown_table(ROWS, ["accuracy@64", "accuracy@128"])
  assert table.splitlines() == [
      "| model | accuracy@64 | accuracy@128 | paper accuracy@64 |",
      "|---|---|---|---|",
      "| Mamba | 100.0 | 50.0 | 100.0 |",
      "| MHA-Abs | 25.0 | — | — |",
  ]


def test_write_results(tmp_path, capsys):
  config = ml_collections.ConfigDict(dict(
      experiment="Induction heads", reproduces="Mamba, Table 2",
      results=dict(columns=["accuracy@64", "accuracy@128"], plot="accuracy_vs_length",
                   group_by="")))
  results.write_results(config, ROWS, str(tmp_path))
  saved = json.loads((tmp_path / "results.json").read_text())
  assert saved["rows"] == ROWS and saved["reproduces"] == "Mamba, Table 2"
  assert "| Mamba | 100.0 | 50.0 | 100.0 |" in (tmp_path / "results.md").read_text()
  assert "| MHA-Abs | 25.0 | — | — |" in capsys.readouterr().out
  has_matplotlib = importlib.util.find_spec("matplotlib") is not None
  assert (tmp_path / "results.png").exists() == has_matplotlib
