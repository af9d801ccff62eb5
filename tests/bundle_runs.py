"""Runs trained once per test module for the evaluation and export tests: the quickstart
(digits, 10 classes) and lfw (2 classes), 2 epochs each, through the CLI."""
import json

from hpcjobs import cli, config
from hpcjobs.data import load_data

from conftest import QUICKSTART

DATASETS = {"quickstart": [], "lfw": ["data.source=lfw"]}


def train(tmp_path_factory, dataset: str, *sets):
    path = tmp_path_factory.mktemp(dataset) / "run"
    items = ["training.epochs=2", *DATASETS[dataset], *sets]
    assert cli.main(["train", QUICKSTART, "--run-dir", str(path), *sum((["--set", s] for s in items), [])]) == 0
    return path


def status(run):
    return json.loads((run / "run.json").read_text())


def test_split(run):
    """The run's test split, as its config prepares it."""
    return load_data(config.load(str(run / "config.yaml"))).splits["test"]


test_split.__test__ = False  # a helper, not a test
