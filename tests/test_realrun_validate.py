"""calibrate's measuring discipline on scripted probes and a fake executor (no torch, no GPU):
interleaved rounds, the re-measure rule for quantities whose rounds disagree, and the validation
step's decisions (which term is measured again, when it stops, what residual it records)."""
import pytest

from realrun.rounds import Measured, interleave, measure, unsettled
from realrun.validate import Check, validate


def scripted(values, log=None, name=None):
    it = iter(values)

    def probe():
        if log is not None:
            log.append(name)
        return next(it)
    return probe


def test_rounds_interleave_every_probe_once_per_round_in_order():
    log = []
    probes = {n: scripted([1.0] * 3, log, n) for n in ("a", "b", "c")}
    found = interleave(probes, 3)
    assert log == ["a", "b", "c"] * 3
    assert [m.values for m in found.values()] == [[1.0] * 3] * 3


def test_value_is_the_median_and_spread_is_range_over_median():
    m = Measured([10.0, 12.0, 11.0])
    assert m.value == 11.0
    assert m.spread == pytest.approx(2.0 / 11.0)


def test_disagreeing_quantity_is_measured_again_alone_and_settles():
    log = []
    probes = {"steady": scripted([5.0, 5.0, 5.0], log, "steady"),
              # a slow spell in round 2: the range keeps it, so the quantity stays unsettled up to the
              # bound, and the median over all its rounds is the steady value
              "drifting": scripted([1.0, 1.3, 1.0, 1.0, 1.0, 1.0, 1.0], log, "drifting")}
    found = measure(probes, rounds=3, spread_limit=0.03, extra_rounds=2, max_remeasures=2)
    assert log == ["steady", "drifting"] * 3 + ["drifting"] * 4  # only the unsettled one again
    assert found["steady"].remeasured == 0 and found["steady"].spread == 0.0
    assert found["drifting"].remeasured == 2  # bounded: the outlier stays in its range
    assert found["drifting"].value == 1.0  # but the median over 7 rounds is the steady value
    assert unsettled(found, 0.03) == ["drifting"]


def test_settled_quantity_is_not_measured_again():
    found = measure({"y": scripted([1.0, 1.01, 1.0, 9.0])}, rounds=3, spread_limit=0.03, max_remeasures=2)
    assert found["y"].remeasured == 0 and len(found["y"].values) == 3  # the 9.0 is never drawn
    found = measure({"z": scripted([1.0, 1.05, 1.0, 1.0, 1.0])}, rounds=3, spread_limit=0.06, max_remeasures=2)
    assert found["z"].remeasured == 0  # the limit decides


CHECKS = [Check("all_resident", "all", "decode_layer"), Check("lru", "half", "after_wait"),
          Check("oracle_prefetch", "half", "copies")]


class FakeCalibration:
    """The simulator's TPOT per check is the measured term's current value times a fixed weight;
    each re-measure of a term draws its next scripted value; the executor's TPOTs are scripted."""

    def __init__(self, terms, real):
        self.terms = {t: list(v) for t, v in terms.items()}
        self.real = {p: list(v) for p, v in real.items()}
        self.remeasured, self.real_runs = [], []

    def run_sim(self, check):
        return {"tpot_mean_s": self.terms[check.term][0], "hit_rate": 0.5}

    def run_real(self, check):
        self.real_runs.append(check.policy)
        values = self.real[check.policy]
        return {"tpot_mean_s": values.pop(0) if len(values) > 1 else values[0], "hit_rate": 0.5}

    def remeasure(self, term):
        self.remeasured.append(term)
        self.terms[term].pop(0)


def run(fake, **kw):
    return validate(CHECKS, fake.run_real, fake.run_sim, fake.remeasure, **kw)


def test_validation_within_tolerance_remeasures_nothing():
    fake = FakeCalibration({"decode_layer": [1.02], "after_wait": [0.98], "copies": [1.0]},
                           {"all_resident": [1.0], "lru": [1.0], "oracle_prefetch": [1.0]})
    result = run(fake, tolerance=0.03)
    assert fake.remeasured == [] and result.residual == {}
    assert [round(o.error, 3) for o in result.outcomes] == [0.02, -0.02, 0.0]
    assert fake.real_runs == ["all_resident", "lru", "oracle_prefetch"]


def test_off_term_is_remeasured_and_only_off_runs_are_made_again():
    fake = FakeCalibration({"decode_layer": [1.0], "after_wait": [1.08, 1.01], "copies": [1.0]},
                           {"all_resident": [1.0], "lru": [1.0], "oracle_prefetch": [1.0]})
    result = run(fake, tolerance=0.03)
    assert fake.remeasured == ["after_wait"]
    assert fake.real_runs == ["all_resident", "lru", "oracle_prefetch", "lru"]
    assert result.residual == {} and result.outcomes[1].remeasured == 1
    assert result.outcomes[1].error == pytest.approx(0.01)


def test_first_off_check_decides_the_term_then_the_next():
    fake = FakeCalibration({"decode_layer": [1.10, 1.0], "after_wait": [1.0], "copies": [0.9, 1.0]},
                           {"all_resident": [1.0], "lru": [1.0], "oracle_prefetch": [1.0]})
    result = run(fake, tolerance=0.03)
    assert fake.remeasured == ["decode_layer", "copies"]  # the decode layer underlies every run: first
    assert result.residual == {}


def test_persistent_error_is_bounded_and_recorded_as_the_terms_residual():
    fake = FakeCalibration({"decode_layer": [1.0], "after_wait": [1.10, 1.09, 1.07, 1.0], "copies": [1.0]},
                           {"all_resident": [1.0], "lru": [1.0], "oracle_prefetch": [1.0]})
    result = run(fake, tolerance=0.03, max_remeasures=2)
    assert fake.remeasured == ["after_wait", "after_wait"]  # never a third time
    assert result.residual == {"after_wait": pytest.approx(0.07)}
    notes = "\n".join(result.notes())
    assert "term after_wait still off by +7.0%" in notes
    assert result.to_dict()["residual_error"] == {"after_wait": pytest.approx(0.07)}


def test_a_slow_executor_run_is_made_again_and_can_clear_the_check():
    # The profile was right; the executor's first lru run caught a slow spell.
    fake = FakeCalibration({"decode_layer": [1.0], "after_wait": [1.0, 1.0], "copies": [1.0]},
                           {"all_resident": [1.0], "lru": [1.2, 1.0], "oracle_prefetch": [1.0]})
    result = run(fake, tolerance=0.03)
    assert fake.remeasured == ["after_wait"] and result.residual == {}
    assert result.outcomes[1].real["tpot_mean_s"] == 1.0


class FittingCalibration(FakeCalibration):
    """As FakeCalibration, and a fit that sets the term to what makes its check give the target."""

    def __init__(self, terms, real):
        super().__init__(terms, real)
        self.fits = []

    def fit(self, check, target):
        self.fits.append((check.term, target))
        factor, self.terms[check.term][0] = target / self.terms[check.term][0], target
        return factor


def test_a_term_still_off_is_fitted_to_the_median_of_its_checks_executor_runs():
    # after_wait re-measured twice and still 7% off; lru's executor runs then: 1.0 (the last re-run), 1.3, 0.98
    fake = FittingCalibration({"decode_layer": [1.0], "after_wait": [1.10, 1.09, 1.07], "copies": [1.0]},
                              {"all_resident": [1.0], "lru": [1.0, 1.0, 1.0, 1.3, 0.98], "oracle_prefetch": [1.0]})
    result = validate(CHECKS, fake.run_real, fake.run_sim, fake.remeasure, tolerance=0.03, max_remeasures=2,
                      fit=fake.fit)
    assert fake.remeasured == ["after_wait", "after_wait"] and fake.fits == [("after_wait", 1.0)]
    lru = result.outcomes[1]
    assert fake.real_runs.count("lru") == 5 and lru.fitted["tpot_mean_s_real"] == [1.0, 1.3, 0.98]
    assert lru.fitted["factor"] == pytest.approx(1 / 1.07) and result.residual == {}
    assert "term after_wait taken from lru's executor runs: scaled 0.935x" in "\n".join(result.notes())
    assert "spread 32.0%" in "\n".join(result.notes())


def test_the_decode_layer_is_fitted_first_and_copies_are_never_fitted():
    fake = FittingCalibration({"decode_layer": [1.2, 1.2, 1.2], "after_wait": [1.0], "copies": [0.9, 0.9, 0.9]},
                              {"all_resident": [1.0], "lru": [1.0], "oracle_prefetch": [1.0]})
    result = validate(CHECKS, fake.run_real, fake.run_sim, fake.remeasure, tolerance=0.03, max_remeasures=2,
                      fit=fake.fit)
    assert [term for term, _ in fake.fits] == ["decode_layer"]
    assert result.residual == {"copies": pytest.approx(-0.1)} and result.outcomes[2].fitted is None
    assert result.to_dict()["checks"][0]["fitted"]["factor"] == pytest.approx(1 / 1.2)


def test_no_fit_is_made_where_the_checks_are_within_tolerance():
    fake = FittingCalibration({"decode_layer": [1.01], "after_wait": [0.99], "copies": [1.0]},
                              {"all_resident": [1.0], "lru": [1.0], "oracle_prefetch": [1.0]})
    result = validate(CHECKS, fake.run_real, fake.run_sim, fake.remeasure, tolerance=0.03, fit=fake.fit)
    assert fake.fits == [] and fake.real_runs == ["all_resident", "lru", "oracle_prefetch"]
    assert all(o.fitted is None for o in result.outcomes)
