import pytest

from sim.budget import parse_budget
from sim.errors import ConfigError

MIXTRAL_EXPERT = 352_321_536


@pytest.mark.parametrize("text, expected", [
    ("6GB", 6 * 10**9), ("512MiB", 512 * 2**20), ("1.5GiB", int(1.5 * 2**30)), ("128experts", 128 * MIXTRAL_EXPERT),
    ("1expert", MIXTRAL_EXPERT), ("6 gb", 6 * 10**9), (400_000_000, 400_000_000),
])
def test_sizes_and_expert_counts(text, expected):
    assert parse_budget(text, MIXTRAL_EXPERT) == expected


@pytest.mark.parametrize("text, message", [
    ("6XB", "unknown unit 'XB'"), ("GB", "is not a size"), ("-1GB", "is not a size"), ("1.5experts", "whole number"),
    ("100MB", "below one expert"), ("0experts", "below one expert"), (True, "is not a size"),
])
def test_bad_budgets_name_the_problem_and_the_fix(text, message):
    with pytest.raises(ConfigError, match=message) as info:
        parse_budget(text, MIXTRAL_EXPERT)
    assert "\n" not in str(info.value)
    assert "6GB" in str(info.value) or "1expert" in str(info.value)
