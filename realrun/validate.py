"""Before calibrate writes a profile: does the simulator, on it, reproduce short runs of the executor?

Each check is one short run, made on the executor and simulated on the profile just measured, and
names the term of the profile it mostly tests: all_resident (no copy, no policy) the decode layer's
time; lru (every miss a demand copy, the work after each wait slower) the after-wait slowdown; a
prefetching policy (copies overlapping compute) the copy curve. A check whose mean TPOT is off by
more than TOLERANCE has its term measured again and the checks run again, up to MAX_REMEASURES
times; what is still off then is written into the profile as the term's residual error, and the
output says which term it was. Torch-free: the runners and the re-measure are callables.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

TOLERANCE = 0.03  # relative mean TPOT error of a check beyond which its term is measured again
MAX_REMEASURES = 2


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
                "tpot_rel_err": self.error, "hit_rate_diff_pts": self.hit_diff_pts, "remeasured": self.remeasured}


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
        lines += [f"validation: term {term} still off by {err:+.1%} after re-measuring; the error is in the profile "
                  f"(calibration.validation.residual_error)" for term, err in self.residual.items()]
        return lines


def validate(checks: list[Check], run_real: Callable[[Check], dict], run_sim: Callable[[Check], dict],
             remeasure: Callable[[str], None], tolerance: float = TOLERANCE,
             max_remeasures: int = MAX_REMEASURES) -> Validation:
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
    return result
