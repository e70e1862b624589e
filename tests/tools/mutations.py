"""The mutations tests/tools/mutate.py applies: small realistic bugs, one at a time.

Each is (id, file, old text, new text, description); its tests are the ones a developer
would run after editing that file (TESTS_FOR, by path prefix; an entry may name its own).
The old text must occur exactly once in the file: when the code moves, the runner
reports the entry as stale, and the entry is updated (or dropped, with the code it mutated).

Two groups: "i19-*" are the bugs issue 19's fault injection found unguarded (each now
caught by a test written for it); the rest were written afterwards, of the same kinds,
to check that the tests catch fresh bugs too. To add one: copy an entry, name what a
user would see wrong in its description.
"""

from __future__ import annotations

from dataclasses import dataclass

# The fast-tier tests a developer runs after editing a file, by the file's path prefix (longest wins).
TESTS_FOR = {
    "flows/study/": ("tests/test_study_statistics.py", "tests/test_study_report.py", "tests/flows/test_flow_study.py"),
    "flows/study/diagnostics.py": ("tests/test_study_report.py", "tests/flows/test_flow_study.py"),
    "flows/sweep/": ("tests/flows/test_flow_sweep.py", "tests/flows/test_sweep_lease.py",
                     "tests/flows/test_flow_study.py", "tests/flows/test_trial_workers.py"),
    "flows/tracking/": ("tests/flows/test_flow_tracking.py", "tests/flows/test_tracking_patience.py",
                        "tests/flows/test_flow_sweep.py", "tests/flows/test_flow_train.py"),
    "flows/cli/": ("tests/ops/test_cli.py",),
    "cnncore/diagnostics.py": ("tests/test_diagnostics.py",),
    "cnncore/checkpoint.py": ("tests/test_checkpoint.py", "tests/test_solver.py"),
    "cnncore/solver.py": ("tests/test_solver.py", "tests/test_checkpoint.py"),
}


@dataclass(frozen=True)
class Mutation:
    id: str
    file: str
    old: str
    new: str
    description: str
    own_tests: tuple[str, ...] = ()

    @property
    def tests(self) -> tuple[str, ...]:
        if self.own_tests:
            return self.own_tests
        prefix = max((p for p in TESTS_FOR if self.file.startswith(p)), key=len, default=None)
        if prefix is None:
            raise ValueError(f"no tests known for {self.file}: add it to TESTS_FOR or give the entry own_tests")
        return TESTS_FOR[prefix]


M = Mutation

MUTATIONS: list[Mutation] = [
    # ------------------------------------------------------------ issue 19's survivors
    M("i19-stats-dropped-one-cell", "flows/study/statistics.py",
      "seen = set().union(*(set(c.index) for c in four))", "seen = set(four[0].index)",
      "dropped seeds looked for in BN(b) only: a seed missing from another cell is never reported"),
    M("i19-stats-delta-unit", "flows/study/statistics.py",
      "DELTA = 0.5  # points", "DELTA = 0.005  # points",
      "the flat margin written as a fraction (0.005) though errors are in points"),
    M("i19-report-signed-by", "flows/study/report.py",
      "by {abs(e.mean):.2f} points", "by {e.mean:.2f} points",
      "'GN loses more than BN, by -3.82 points'"),
    M("i19-report-one-image", "flows/study/report.py",
      "one image = {100 / base.num_test:.2f} points", "one image = {1 / base.num_test:.2f} points",
      "the design paragraph's 'one image = 0.00 points'"),
    M("i19-report-compared-with", "flows/study/report.py",
      'COMPARED_WITH = ("groupnorm", "layernorm", "instancenorm", "none")',
      'COMPARED_WITH = ("layernorm", "groupnorm", "instancenorm", "none")',
      "the bn-vs-gn preset's report answers BN vs LN instead of BN vs GN"),
    M("i19-diag-train-mode", "cnncore/diagnostics.py",
      'labels = _labels(model.scores(X[batch], mode))[first]', 'labels = _labels(model.scores(X[batch], "test"))[first]',
      "train_test_error scores every batch in test mode"),
    M("i19-diag-worst-layer", "flows/study/diagnostics.py",
      'worst = float(layers["n_eff"].min())', 'worst = float(layers["n_eff"].max())',
      "the 'worst layer' is the one with the largest n_eff"),
    M("i19-diag-mean-over-seeds", "flows/study/diagnostics.py",
      "return grouped.median(numeric_only=True)", "return grouped.mean(numeric_only=True)",
      "the diagnostics summary takes the mean over seeds instead of the median"),
    M("i19-sweep-progress-total", "flows/sweep/executors.py",
      "progress = Progress(spec, len(todo))", "progress = Progress(spec, len(spec.trials()))",
      "a resumed sweep's progress counts every planned trial: [1/8] when 2 are left"),
    M("i19-sweep-best-direction", "flows/sweep/results.py",
      "return max((r for r in results if r.status == FINISHED), key=lambda r: r.best_val_acc, default=None)",
      "return min((r for r in results if r.status == FINISHED), key=lambda r: r.best_val_acc, default=None)",
      "the best trial is the one with the lowest validation accuracy"),
    M("i19-sweep-study-measure", "flows/sweep/summary.py",
      '"test_error": _percent_error(r.final_test_acc), "best_val_test_error": _percent_error(r.test_acc),',
      '"test_error": _percent_error(r.test_acc), "best_val_test_error": _percent_error(r.test_acc),',
      "the study reports the best-validation net's error instead of the final net's"),
    M("i19-sweep-skipped-final", "flows/sweep/resume.py",
      'final_test_acc=metrics.get("final_test_acc")', 'final_test_acc=metrics.get("test_acc")',
      "a skipped (resumed) trial's final_test_acc read from test_acc"),
    M("i19-lease-ms", "flows/sweep/lease.py",
      'TAG_EXPIRES: f"{time.time() + ttl_s:.3f}"', 'TAG_EXPIRES: f"{(time.time() + ttl_s) * 1000:.0f}"',
      "the lease expiry written in milliseconds and read as seconds: a lease never lapses"),
    M("i19-sweep-stop-queued", "flows/sweep/executors.py",
      "    if stop:\n        return None\n    name = trial_name(spec, index, config)",
      "    name = trial_name(spec, index, config)",
      "a stopping sweep still starts its queued trials"),
    M("i19-tracking-traceback", "flows/tracking/run.py",
      '        self._client.log_text(self.id, "".join(traceback.format_exception(exc)), "failure/traceback.txt")\n', "",
      "a failed run loses its failure/traceback.txt"),
    M("i19-cli-exit-code", "flows/cli/errors.py",
      'fail(str(exc), getattr(exc, "exit_code", 1))', "fail(str(exc), 1)",
      "the project's errors lose their exit code (a changed sweep base exits 1, not 2)"),
    M("i19-cli-json-nan", "flows/answers.py",
      "    if isinstance(value, float) and not math.isfinite(value):\n        return None\n", "",
      "--output json writes NaN, which is not JSON"),
    M("i19-ckpt-newer-format", "cnncore/checkpoint.py",
      'if arrays["format"].item() != CHECKPOINT_FORMAT:', 'if arrays["format"].item() < CHECKPOINT_FORMAT:',
      "a checkpoint of a newer format is read as the current one"),
    M("i19-ckpt-one-sided-key", "cnncore/checkpoint.py",
      "for key in sorted(set(saved) | set(current))", "for key in sorted(set(saved) & set(current))",
      "a model_config key present on one side only is ignored"),
]
