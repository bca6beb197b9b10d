"""``sharpguard study --scenario``: the verdict rule by hand, the rescaling laws, and every scenario's report."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from sharpguard.cli import main
from sharpguard.errors import ConfigurationError
from sharpguard.study.scenarios import (
    RUNNERS,
    Claim,
    ScenarioSettings,
    decide,
    difference_claim,
    paired_claim,
    rescale,
    run_scenario,
)

VERDICTS = {"held", "did not hold", "inconclusive", "smoke test"}


def _claim(estimate, p, sign):
    return Claim("c", "src", "pub", "stat", estimate, p_value=p, expected_sign=sign)


def test_verdicts_follow_holm_adjusted_p_and_the_published_sign():
    # p = 0.01, 0.02, 0.04 -> Holm 0.03, 0.04, 0.04: all significant at 0.05
    claims = [_claim(1.0, 0.01, +1), _claim(1.0, 0.02, -1), _claim(-1.0, 0.04, -1)]
    family = decide(claims)
    assert family["n_tests"] == 3
    assert [c.p_adjusted for c in claims] == pytest.approx([0.03, 0.04, 0.04])
    assert [c.verdict for c in claims] == ["held", "did not hold", "held"]
    # raw p = 0.03 is below 0.05 but Holm over four tests (2 * 0.03 = 0.06 at rank 3) is not
    claims = [_claim(1.0, 0.001, +1), _claim(1.0, 0.002, +1), _claim(1.0, 0.03, +1), _claim(1.0, 0.5, +1)]
    decide(claims)
    assert claims[2].p_adjusted == pytest.approx(0.06) and claims[2].verdict == "inconclusive"
    # an exact law keeps its own verdict and does not count as a test
    law = Claim("law", "src", "pub", "stat", 0.0, expected_sign=0, verdict="held")
    assert decide([law])["n_tests"] == 0 and law.verdict == "held"


def test_claim_builders_by_hand():
    c = difference_claim("d", "s", "p", [1.0, 2.0, 3.0], [4.0, 5.0, 6.0], "a - b", -1)
    assert c.estimate == pytest.approx(-3.0) and c.effect_size == pytest.approx(-2.4) and c.n == 6
    d = paired_claim("p", "s", "p", [1.0, 2.0, 3.0], "diff", +1)
    # mean 2, sd 1, t = 2 sqrt(3) with 2 df
    from scipy import stats

    assert d.estimate == pytest.approx(2.0) and d.effect_size == pytest.approx(2.0)
    assert d.p_value == pytest.approx(2 * stats.t.sf(2 * 3**0.5, 2))


def test_rescale_preserves_the_function():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    x = torch.rand(7, 4)
    scaled = rescale(model, 1, 3, 7.0)
    assert torch.allclose(model(x), scaled(x), rtol=1e-5, atol=1e-6)
    assert torch.allclose(scaled[1].weight,
                          7.0 * model[1].weight) and torch.allclose(scaled[3].weight, model[3].weight / 7)


@pytest.mark.parametrize("name", sorted(RUNNERS))
def test_every_scenario_writes_its_report(tmp_path, name):
    result = run_scenario(name, tmp_path / name, ScenarioSettings(seeds=2, quick=True), progress=False)
    report = json.loads((tmp_path / name / "scenario.json").read_text())
    assert report["scenario"] == name and report["claims"]
    for c in report["claims"]:
        assert c["verdict"] in VERDICTS and c["published"] and c["source"]
        assert c["estimate"] is not None
        if c["expected_sign"] != 0 and c["p_value"] is not None:
            assert c["p_adjusted"] >= c["p_value"] - 1e-12
    md = (tmp_path / name / "scenario.md").read_text()
    assert "| claim | published (source) | our number |" in md
    assert all(f"**{c['verdict']}**" in md for c in report["claims"])
    # a --quick run is a smoke test: its first console line says so, and no statistical claim gets a verdict
    assert result.summary[0].startswith("smoke test") and len(result.summary) == len(report["claims"]) + 1
    assert all(c["verdict"] == "smoke test" for c in report["claims"] if c["expected_sign"] != 0)
    if name == "rescaling":  # exact laws: these must hold on any trained ReLU net
        verdicts = {c["name"]: c["verdict"] for c in report["claims"]}
        assert verdicts["function_preserved"] == "held"
        assert verdicts["relative_flatness_invariant"] == "held"
        assert verdicts["lambda_max_moves"] == "held"
        assert verdicts["input_curvature_invariant"] == "held"  # the function, hence its input Hessian, is unchanged
    if name == "large_batch":
        arms = report["data"]["confounder"]
        assert arms["small"]["batch_size"] == 32 and arms["large"]["lr"] == arms["small"]["lr"]
        assert arms["large_scaled_lr"]["lr_over_batch"] == pytest.approx(arms["small"]["lr_over_batch"])
        assert "## The confounder: learning rate over batch size" in md and "| large_scaled_lr | " in md
    if name == "local_global":
        taus = report["data"]["tau_by_eps"]
        assert list(taus) == ["0.02", "0.1", "0.3"] and "## Relative flatness against robust accuracy" in md


def test_scenario_cli_and_its_errors(tmp_path, capsys):
    out = tmp_path / "resc"
    assert main(["study", "--scenario", "rescaling", "--quick", "--no-progress", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "scenario.md" in printed and "relative_flatness_invariant" in printed
    assert main(["study", "--scenario", "rescaling", "--methods", "sgd", "--out", str(out)]) == 2
    assert "do not apply to --scenario" in capsys.readouterr().err
    assert main(["study", "--scenario", "rescaling", "--seeds", "1", "--out", str(out)]) == 2
    assert "at least 2 seeds" in capsys.readouterr().err
    with pytest.raises(ConfigurationError, match="unknown scenario"):
        run_scenario("nope", tmp_path / "x")
    with pytest.raises(SystemExit):
        main(["study", "--scenario", "nope"])
