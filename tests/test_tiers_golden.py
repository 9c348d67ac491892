"""Every policy from before the CPU and disk tiers gives exactly the figures it gave then."""
import json

import pytest

from tests.golden_tiers import GOLDEN, figures, make_trace


@pytest.fixture(scope="module")
def trace(tmp_path_factory):
    return make_trace(tmp_path_factory.mktemp("golden"))


def test_policies_unchanged_with_the_cpu_and_disk_tiers_off(trace):
    assert figures(trace) == json.loads(GOLDEN.read_text())
