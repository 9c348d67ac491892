"""Before calibrate writes a profile: does the simulator, on it, reproduce short runs of the executor?

Each check is one short run, made on the executor and simulated on the profile just measured, and
names the term of the profile it mostly tests: all_resident (no copy, no policy) the decode layer's
time; lru (every miss a demand copy, the work after each wait slower) the after-wait slowdown; a
prefetching policy (copies overlapping compute) the copy curve. A check whose mean TPOT is off by
more than TOLERANCE has its term measured again and the checks run again, up to MAX_REMEASURES
times; what is still off then is written into the profile as the term's residual error, and the
output says which term it was. A term that realrun.fit can solve for (the decode layer, the
after-wait slowdown) and that is still off then is taken from the executor instead: its check is
run FIT_ROUNDS times in all, and the term's scale solved so that the simulation gives their median
(`fit`); the other checks are simulated again on the fitted profile. The checks run on a request the
compare does not measure (calibrate), so what they fit is checked there on other requests, budgets
and policies. Torch-free: the runners, the re-measure and the fit are callables.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Callable

TOLERANCE = 0.03  # relative mean TPOT error of a check beyond which its term is measured again
MAX_REMEASURES = 2
FIT_ROUNDS = 3  # executor runs of a check whose term is fitted: their median is the target
FITTED_TERMS = ("decode_layer", "after_wait")  # what realrun.fit solves for, in this order


@dataclass(frozen=True)
class Check:
    policy: str
    budget: str
    term: str  # the profile term this run tests (what is measured again when it is off)


DEFAULT_CHECKS = (Check("all_resident", "all", "decode_layer"), Check("lru", "half", "after_wait"),
                  Check("oracle_prefetch", "half", "copies"))


@dataclass
class Outcome:
    check: Check
    sim: dict  # {"tpot_mean_s", "hit_rate"}
    real: dict
    remeasured: int = 0  # times its term was measured again because of it
    # Its term fitted to it: {"factor": the term's scale, "tpot_mean_s_real": the rounds' mean TPOTs}
    fitted: dict | None = None

    @property
    def error(self) -> float:
        return self.sim["tpot_mean_s"] / self.real["tpot_mean_s"] - 1.0

    @property
    def hit_diff_pts(self) -> float:
        return 100.0 * (self.sim["hit_rate"] - self.real["hit_rate"])

    def off(self, tolerance: float) -> bool:
        return abs(self.error) > tolerance

    def to_dict(self) -> dict:
        return {"policy": self.check.policy, "budget": self.check.budget, "term": self.check.term,
                "tpot_mean_s_sim": self.sim["tpot_mean_s"], "tpot_mean_s_real": self.real["tpot_mean_s"],
                "tpot_rel_err": self.error, "hit_rate_diff_pts": self.hit_diff_pts, "remeasured": self.remeasured,
                **({"fitted": self.fitted} if self.fitted else {})}


@dataclass
class Validation:
    outcomes: list[Outcome]
    tolerance: float
    remeasured_terms: list[str] = field(default_factory=list)  # in the order they were measured again

    @property
    def residual(self) -> dict[str, float]:
        """Each term's error still beyond the tolerance after the re-measures (the largest of its checks)."""
        worst: dict[str, float] = {}
        for o in self.outcomes:
            if o.off(self.tolerance) and abs(o.error) > abs(worst.get(o.check.term, 0.0)):
                worst[o.check.term] = o.error
        return worst

    def to_dict(self) -> dict:
        return {"tolerance": self.tolerance, "checks": [o.to_dict() for o in self.outcomes],
                "remeasured_terms": list(self.remeasured_terms), "residual_error": self.residual}

    def notes(self) -> list[str]:
        lines = [f"validation (short executor runs simulated on this profile; a term is measured again when its run "
                 f"is off by more than {self.tolerance:.0%}): " + ", ".join(
                     f"{o.check.policy} {o.error:+.1%} TPOT, {o.hit_diff_pts:+.2f} pts ({o.check.term}"
                     + (f", measured again {o.remeasured}x" if o.remeasured else "") + ")" for o in self.outcomes)]
        for o in self.outcomes:
            if o.fitted:
                rounds = o.fitted["tpot_mean_s_real"]
                lines.append(f"validation: term {o.check.term} taken from {o.check.policy}'s executor runs: scaled "
                             f"{o.fitted['factor']:.3f}x so that the simulation gives their median "
                             f"({statistics.median(rounds) * 1e3:.2f} ms of {len(rounds)} runs, spread "
                             f"{(max(rounds) - min(rounds)) / statistics.median(rounds):.1%})")
        lines += [f"validation: term {term} still off by {err:+.1%}; the error is in the profile "
                  f"(calibration.validation.residual_error)" for term, err in self.residual.items()]
        return lines


def validate(checks: list[Check], run_real: Callable[[Check], dict], run_sim: Callable[[Check], dict],
             remeasure: Callable[[str], None], tolerance: float = TOLERANCE,
             max_remeasures: int = MAX_REMEASURES, fit: Callable[[Check, float], float | None] | None = None,
             fit_rounds: int = FIT_ROUNDS) -> Validation:
    """Run every check on both sides; while some check is off (and fewer than `max_remeasures`
    re-measures were made), measure the term of the first one off again (checks are ordered so
    earlier terms underlie later ones: the decode layer is in every run) and re-run: the simulator
    for every check (the profile changed), the executor for the checks that were off (their
    measured side may have been the one caught in a slow spell)."""
    outcomes = [Outcome(c, run_sim(c), run_real(c)) for c in checks]
    result = Validation(outcomes, tolerance)
    for _ in range(max_remeasures):
        off = [o for o in outcomes if o.off(tolerance)]
        if not off:
            break
        term = off[0].check.term
        remeasure(term)
        result.remeasured_terms.append(term)
        off[0].remeasured += 1
        for o in outcomes:
            if o.off(tolerance):
                o.real = run_real(o.check)
            o.sim = run_sim(o.check)
    if fit is not None:
        for term in FITTED_TERMS:
            _fit_term(term, outcomes, tolerance, run_real, run_sim, fit, fit_rounds)
    return result


def _fit_term(term: str, outcomes: list[Outcome], tolerance: float, run_real: Callable[[Check], dict],
              run_sim: Callable[[Check], dict], fit: Callable[[Check, float], float | None], rounds: int) -> None:
    """The first check of `term` still off: its term fitted (fit(check, target mean TPOT) -> its scale,
    None where the profile has no such term) to the median of its executor runs; every check simulated
    again on the fitted profile."""
    o = next((o for o in outcomes if o.check.term == term and o.off(tolerance)), None)
    if o is None:
        return
    reals = [o.real] + [run_real(o.check) for _ in range(rounds - 1)]
    o.real = sorted(reals, key=lambda r: r["tpot_mean_s"])[len(reals) // 2]
    factor = fit(o.check, o.real["tpot_mean_s"])
    if factor is None:  # the profile has no such term to scale
        return
    o.fitted = {"factor": factor, "tpot_mean_s_real": [r["tpot_mean_s"] for r in reals]}
    for other in outcomes:
        other.sim = run_sim(other.check)
