"""python -m realrun.refit PROFILE --trace T [--layers N] --train-fraction F [--max-requests M] [--replayed-host-time] --out OUT

Takes a calibrated profile's decode layer and after-wait terms from the executor runs its validation
recorded (calibration.validation: each check's measured mean TPOT), as calibrate now does when a
term is still off after its re-measures (realrun.fit), and writes the refitted profile: for a profile
written before calibrate fitted, so that its device call's measured runs can be joined with the
fitted terms (realrun.compare --real-from). Needs no GPU. Each check's one recorded run is the
target (calibrate itself takes the median of three); the checks' request is the validation's own
(`request` and `tokens` in it), or, for a profile that predates them, the first of those replayed at
--train-fraction (--max-requests of them), as that calibrate ran them.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import yaml

from realrun.calibrate import fit_to, validation_runners, with_fits
from realrun.subset import first_layers, held_out_head
from realrun.validate import FITTED_TERMS, Check
from sim.profiles import HardwareProfile
from traces import load_trace
from traces.atomic import atomic_write_text
from traces.cli import ArgumentParser, run_cli
from traces.defaults import resolve_trace
from traces.errors import UserError


def refit(data: dict, trace, train_fraction: float, max_requests: int | None, work_dir: Path) -> tuple[dict, dict]:
    """(the profile's fields with its off terms fitted, {term: scale})."""
    validation = (data.get("calibration") or {}).get("validation")
    if not validation:
        raise UserError("the profile records no validation (calibration.validation); calibrate it again")
    if "request" in validation:
        trace, train_fraction, _ = held_out_head(trace, train_fraction, validation["tokens"], work_dir / "head")
        max_requests = 1
    measured = HardwareProfile.from_dict(data)
    current, fitted = {"profile": measured}, {}

    def rebuild() -> None:
        current["profile"] = with_fits(measured, trace.model, fitted)
    _, run_sim = validation_runners(lambda: current["profile"], trace, None, train_fraction, max_requests)
    fit = fit_to(run_sim, lambda: current["profile"], trace.model, fitted, rebuild)
    checks = {c["term"]: c for c in validation["checks"]}
    for term in FITTED_TERMS:  # off on this profile (its host times may not be the validation's)
        if term not in checks:
            continue
        check, real = Check(checks[term]["policy"], checks[term]["budget"], term), checks[term]["tpot_mean_s_real"]
        if abs(run_sim(check)["tpot_mean_s"] / real - 1) > validation["tolerance"]:
            fit(check, real)
    return {**current["profile"].to_dict(), "calibration": data["calibration"]}, fitted


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="python -m realrun.refit", description=__doc__.split("\n\n")[1])
    parser.add_argument("profile", help="a profile YAML written by realrun.calibrate")
    parser.add_argument("--trace", required=True, help="calibrate's --policy-trace")
    parser.add_argument("--layers", type=int, default=None, help="calibrate's --policy-layers")
    parser.add_argument("--train-fraction", type=float, required=True)
    parser.add_argument("--max-requests", type=int, default=None)
    parser.add_argument("--replayed-host-time", action="store_true",
                        help="charge the policies' host time as replayed (calibration.policy_host_replay_s), as "
                             "calibrate writes it without --executor-host, for a profile calibrated with it")
    parser.add_argument("--out", required=True, help="the refitted profile's YAML path")
    args = parser.parse_args(argv)

    def work() -> None:
        path = Path(args.profile)
        data = yaml.safe_load(path.read_text()) if path.is_file() else None
        if not isinstance(data, dict):
            raise UserError(f"{args.profile}: not a profile YAML; give one realrun.calibrate wrote (its --out)")
        if args.replayed_host_time:
            replayed = (data.get("calibration") or {}).get("policy_host_replay_s")
            if not replayed:
                raise UserError(f"{args.profile}: no replayed host time recorded (calibrated without --executor-host?)")
            data["policy_host_s"] = replayed
        with tempfile.TemporaryDirectory() as tmp:
            trace = load_trace(resolve_trace(args.trace))
            if args.layers is not None:
                trace = first_layers(trace, args.layers, Path(tmp) / "trace")
            refitted, fitted = refit(data, trace, args.train_fraction, args.max_requests, Path(tmp))
        atomic_write_text(Path(args.out), yaml.safe_dump(refitted, sort_keys=False, width=200))
        print(", ".join(f"{term} scaled {factor:.3f}x" for term, factor in fitted.items()) or "no term was off")
    run_cli(work)


if __name__ == "__main__":
    main()
