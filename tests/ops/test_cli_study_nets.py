"""The `cnnflow` options that reach issue 17's nets: the normalization batch (ghost batch norm),
refused or taken before any work starts."""

from __future__ import annotations

from typer.testing import CliRunner

from flows import cli
from flows.cli import options as cli_options
from flows.cli import run as cli_run
from flows.config import SweepSpec
from flows.deployments import load_entrypoint

runner = CliRunner()


def test_train_help_describes_the_norm_batch_option():
    (option,) = [o for o in cli_options.flow_options(load_entrypoint(cli_run.FLOWS["train"]))
                 if o.flag == "--norm-batch"]
    assert "ghost batch norm" in option.help and "unset: the whole SGD batch" in option.help
    result = runner.invoke(cli.app, ["run", "train", "--help"], terminal_width=200)
    assert result.exit_code == 0 and "--norm-batch" in result.output


def test_a_norm_batch_that_does_not_divide_the_batch_is_one_line_and_exit_code_2():
    result = runner.invoke(cli.app, ["run", "train", "--norm-batch", "5"], catch_exceptions=False)
    assert result.exit_code == 2
    (line,) = result.output.strip().splitlines()
    assert line.startswith("error: invalid parameters: norm_batch=5 must divide batch_size=32")


def test_a_sweep_space_over_norm_batch_parses_to_trials_that_run_group_norm_once():
    options = cli_options.flow_options(load_entrypoint(cli_run.FLOWS["sweep"]))
    given = {"space": ["normalization=batchnorm,groupnorm", "norm_batch=32,8,2"], "name": "ghost"}
    params = cli_options.collect_parameters(options, given, None)
    spec = SweepSpec(**params["spec"])
    assert [(t.normalization, t.norm_batch) for t in spec.trials()] == [
        ("batchnorm", 32), ("batchnorm", 8), ("batchnorm", 2), ("groupnorm", None)]


def test_the_model_option_offers_the_resnet_and_checks_its_groups_at_once():
    (option,) = [o for o in cli_options.flow_options(load_entrypoint(cli_run.FLOWS["train"])) if o.flag == "--model"]
    assert "resnet" in option.help
    result = runner.invoke(cli.app, ["run", "train", "--model", "resnet", "--normalization", "groupnorm",
                                     "--num-filters", "6", "--num-groups", "4"], catch_exceptions=False)
    assert result.exit_code == 2
    (line,) = result.output.strip().splitlines()
    assert line.startswith("error: invalid parameters: num_groups=4 must divide num_filters=6")
