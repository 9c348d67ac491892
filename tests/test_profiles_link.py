"""Hardware profiles: the measured copy-time curve of a link, and its round trip through YAML data."""
import pytest

from sim.errors import ConfigError
from sim.profiles import HardwareProfile, LinkSpec


def test_measured_curve_is_interpolated_and_the_fit_covers_smaller_copies():
    link = LinkSpec.from_dict({"latency_s": 1e-5, "bandwidth_Bps": 1e9,
                               "copy_time_s": [[1e6, 5e-3], [3e6, 8e-3], [5e6, 10e-3]]}, "link")
    assert link.copy_time(2e6) == pytest.approx(6.5e-3)  # between the measured points
    assert link.copy_time(7e6) == pytest.approx(12e-3)  # past the last: the last segment's slope
    assert link.copy_time(1e3) == pytest.approx(1e-5 + 1e-6)  # below the curve: latency + bytes / bandwidth
    assert LinkSpec.from_dict(link.to_dict(), "link") == link


def test_profile_round_trip_keeps_the_curve_and_rejects_a_bad_one():
    data = {"name": "x", "gpu_memory_bytes": 1e9, "mem_bandwidth_Bps": 1e12, "matmul_flops": 1e15,
            "host_link": {"latency_s": 0.0, "bandwidth_Bps": 1e9, "copy_time_s": [[1e6, 1e-3]]}}
    profile = HardwareProfile.from_dict(data)
    assert HardwareProfile.from_dict(profile.to_dict()) == profile
    data["host_link"]["copy_time_s"] = [[0, 1e-3]]
    with pytest.raises(ConfigError, match="bytes > 0"):
        HardwareProfile.from_dict(data)
