"""The dose-response report across the normalization-batch presets, from synthetic exported studies.

Each preset's points are checked against the paired differences computed here with
scipy; the reading is checked on nets built to lose (an FC net whose loss grows with
the noise) and not to lose (a convnet whose statistics stay quiet).
"""

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from flows.study.dose_response import build_dose_response, main, preset_points
from flows.study.statistics import holm

SEEDS = tuple(range(6))
LEVELS = (32, 16, 8, 4, 2)


def records(loss_at: dict[int, float], other: str, rng_seed: int) -> pd.DataFrame:
    """BN at every g (SGD batch 32) with loss_at[g] points added, the other norm once per seed; seed effects
    shared by a seed's trials."""
    rng = np.random.default_rng(rng_seed)
    effect = rng.normal(0, 0.5, len(SEEDS))
    rows = [("batchnorm", 32, g, s, 2.0 + effect[s] + loss_at.get(g, 0.0) + rng.normal(0, 0.2))
            for g in LEVELS for s in SEEDS]
    rows += [(other, 32, 32, s, 2.3 + effect[s] + rng.normal(0, 0.2)) for s in SEEDS]
    return pd.DataFrame(rows, columns=["normalization", "batch_size", "norm_batch", "seed", "test_error"])


def layers(noise_at: dict[int, tuple[float, ...]], pooled_per_image: tuple[int, ...]) -> pd.DataFrame:
    """A diagnostics_layers table as the preset's report exports it: BN's noise and values pooled per layer."""
    rows = [{"normalization": "batchnorm", "norm_batch": g, "layer": i + 1, "batch_noise": noise,
             "nominal": g * pooled_per_image[i], "num_seeds": len(SEEDS)}
            for g, noises in noise_at.items() for i, noise in enumerate(noises)]
    return pd.DataFrame(rows)


FC = (records({4: 3.0, 2: 40.0}, "layernorm", 0),
      layers({32: (0.05, 0.06), 16: (0.07, 0.09), 8: (0.10, 0.13), 4: (0.15, 0.21), 2: (0.6, 0.9)}, (1, 1)))
CONV = (records({}, "groupnorm", 1),
        layers({32: (0.004, 0.01), 16: (0.006, 0.015), 8: (0.008, 0.02), 4: (0.012, 0.03), 2: (0.02, 0.04)},
               (784, 196)))


def test_each_point_is_bn_against_g_32_paired_by_seed_with_holm_over_g():
    trials, diag = FC
    points = {p.g: p for p in preset_points("normbatch-fc", trials, diag)}
    assert sorted(points, reverse=True) == [16, 8, 4, 2]
    error = trials[trials.normalization == "batchnorm"].set_index(["norm_batch", "seed"])["test_error"]
    diffs = {g: np.array([error[g, s] - error[32, s] for s in SEEDS]) for g in (16, 8, 4, 2)}
    adjusted = dict(zip(diffs, holm([stats.ttest_1samp(d, 0).pvalue for d in diffs.values()])))
    for g, d in diffs.items():
        low, high = stats.t.interval(0.95, len(d) - 1, loc=d.mean(), scale=d.std(ddof=1) / math.sqrt(len(d)))
        p = points[g]
        assert (p.n, p.extra, p.low, p.high) == (6, pytest.approx(d.mean()), pytest.approx(low), pytest.approx(high))
        assert p.p_holm == pytest.approx(adjusted[g])
    # The diagnostics at g: the noisiest layer's noise, the fewest values pooled.
    assert (points[2].noise, points[2].noise_layer, points[2].pooled) == (0.9, 2, 2)
    ln = trials[trials.normalization == "layernorm"].set_index("seed")["test_error"]
    assert points[2].gap == pytest.approx(np.mean([error[2, s] - ln[s] for s in SEEDS]))
    assert points[2].versus == "LN" and points[2].detected and not points[16].detected


def test_the_reading_says_where_losses_begin_and_what_the_quiet_net_can_lose():
    result = build_dose_response({"normbatch-fc": FC, "normbatch-convnet3": CONV})
    points = {(p["preset"], p["g"]): p for p in result.tables["points"].to_dict("records")}
    fc4, conv2 = points["normbatch-fc", 4], points["normbatch-convnet3", 2]
    quiet = max((p for p in points.values() if not p["detected"]), key=lambda p: p["noise"])
    assert fc4["detected"] and not conv2["detected"]
    text = result.markdown
    assert ("The least statistics noise at which batch norm's loss is detected (Holm over each preset's g values): "
            "21.0% (a fully connected net of 4 hidden layers, g = 4: ") in text
    assert f"The most statistics noise at which no loss is detected: {100 * quiet['noise']:.1f}%" in text
    assert (f"A 3-block convnet shows no loss down to g = 2: batch norm's extra error there is at most "
            f"{conv2['upper']:+.2f} points (one-sided 95%, n=6)") in text
    assert "A fully connected net of 4 hidden layers loses at g = 4, 2:" in text
    assert result.answer_figure == "dose_response"


def test_overlapping_noise_is_said_not_to_separate_the_nets():
    """A quiet net noisier than a losing one: the noise at one layer is not the whole story."""
    trials, _ = CONV
    loud = layers({32: (0.5,), 16: (0.5,), 8: (0.5,), 4: (0.5,), 2: (0.5,)}, (784,))
    result = build_dose_response({"normbatch-fc": FC, "normbatch-convnet3": (trials, loud)})
    assert "The noise does not separate them" in result.markdown


def test_the_figure_puts_each_point_with_its_interval_against_noise_and_values_pooled():
    result = build_dose_response({"normbatch-fc": FC, "normbatch-convnet3": CONV})
    noise_ax, pooled_ax = result.figures["dose_response"].axes
    assert noise_ax.get_xscale() == "log" and pooled_ax.get_xscale() == "log" and pooled_ax.xaxis_inverted()
    low, high = noise_ax.get_ylim()
    assert -100 <= low < high <= 100
    bars = [s for c in noise_ax.collections if c.__class__.__name__ == "LineCollection" for s in c.get_segments()]
    fc2 = next(p for p in preset_points("normbatch-fc", *FC) if p.g == 2)
    assert any(seg[0][0] == pytest.approx(90.0) and seg[0][1] == pytest.approx(fc2.low)
               and seg[1][1] == pytest.approx(fc2.high) for seg in bars)


def test_the_command_reads_exported_presets_and_writes_the_report(tmp_path, capsys):
    studies, dest = tmp_path / "studies", tmp_path / "out"
    for name, (trials, diag) in (("normbatch-fc", FC), ("normbatch-convnet3", CONV)):
        (studies / name).mkdir(parents=True)
        trials.to_csv(studies / name / "trials.csv", index=False)
        diag.to_csv(studies / name / "diagnostics_layers.csv", index=False)
    assert main(["--studies", str(studies), "--to", str(dest)]) == 0
    assert {p.name for p in dest.iterdir()} == {"report.md", "report.html", "dose_response.png", "points.csv"}
    markdown = (dest / "report.md").read_text()
    assert "Presets read: normbatch-fc, normbatch-convnet3; missing: normbatch-convnet4, normbatch-convnet5, " \
           "normbatch-resnet." in markdown
    assert (dest / "report.html").read_text().count('<img src="data:image/png;base64,') == 1
    assert "The least statistics noise" in capsys.readouterr().out



def test_the_command_reads_the_small_presets_by_suffix_and_records_the_command_that_does(tmp_path):
    studies, dest = tmp_path / "studies", tmp_path / "out"
    (studies / "normbatch-fc-small").mkdir(parents=True)
    FC[0].to_csv(studies / "normbatch-fc-small" / "trials.csv", index=False)
    FC[1].to_csv(studies / "normbatch-fc-small" / "diagnostics_layers.csv", index=False)
    (studies / "normbatch-convnet3").mkdir()  # a full preset's folder is not read with --suffix -small
    CONV[0].to_csv(studies / "normbatch-convnet3" / "trials.csv", index=False)
    assert main(["--studies", str(studies), "--suffix=-small", "--to", str(dest)]) == 0
    markdown = (dest / "report.md").read_text()
    assert "Presets read: normbatch-fc; missing: normbatch-convnet3," in markdown
    assert f"`python -m flows.study.dose_response --studies {studies} --suffix=-small --to {dest}`" in markdown

def test_the_command_without_any_preset_says_what_to_run(tmp_path, capsys):
    assert main(["--studies", str(tmp_path), "--to", str(tmp_path / "out")]) == 1
    assert "no normalization-batch preset found under" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_two_seed_dose_response_says_it_is_a_smoke_test_before_any_number():
    two = {name: (trials[trials.seed < 2], diag) for name, (trials, diag) in
           (("normbatch-fc", FC), ("normbatch-convnet3", CONV))}
    smoke = build_dose_response(two)
    assert smoke.answer.startswith("Smoke test (2 seeds), not a result: ")
    title, blank, banner = smoke.markdown.split("\n")[:3]
    assert banner.startswith("> **A smoke test, not a result: 2 seeds.**") and "Run the full presets" in banner
    assert smoke.markdown.index(banner) < smoke.markdown.index("## The answer")
    full = build_dose_response({"normbatch-fc": FC, "normbatch-convnet3": CONV})
    assert "smoke" not in full.markdown.lower() and not full.answer.lower().startswith("smoke")
