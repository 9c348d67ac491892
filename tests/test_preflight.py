"""Commands that need a GPU or much memory say so up front, in one line, instead of falling back to
the CPU silently and being killed by the kernel later."""
import subprocess
import sys

import pytest

from conftest import repo_env, tiny_model
from traces.errors import UserError
from traces.model_spec import load_model_spec
from traces.resources import available_memory_bytes, require_memory



def no_gpu() -> bool:
    """Whether this machine lacks a GPU; skips a test where torch (which tells) is not installed."""
    return not pytest.importorskip("torch").cuda.is_available()


def test_memory_needed_beyond_what_is_available_is_refused_with_both_figures():
    with pytest.raises(UserError, match=r"^x needs about 30.0 GB of memory, this machine has 24.0 GB available; fix$"):
        require_memory("x", 30e9, "fix", available=int(24e9))
    require_memory("x", 1e9, "fix", available=int(24e9))
    assert available_memory_bytes() > 0


def test_calibrate_on_the_cpu_estimates_its_peak_before_starting():
    pytest.importorskip("torch")  # realrun runs on torch
    from realrun.preflight import check_calibrate, device_bytes

    mixtral = load_model_spec("mixtral-8x7b")
    assert device_bytes(mixtral) >= 8 * 8 * mixtral.bytes_per_expert  # every expert of 8 layers resident
    with pytest.raises(UserError, match=r"realrun.calibrate of mixtral-8x7b on the CPU needs about 2\d.\d GB"):
        check_calibrate("cpu", [tiny_model(), mixtral], available=int(24e9))
    check_calibrate("cpu", [tiny_model()], available=int(24e9))  # the tests' tiny shapes run


def test_calibrate_without_a_gpu_says_so_in_one_line():
    if not no_gpu():
        pytest.skip("checks the refusal on a machine without a GPU")
    done = subprocess.run([sys.executable, "-m", "realrun.calibrate", "--quick"], env=repo_env(),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "runs on a GPU and this machine has none" in done.stderr and "--device cpu" in done.stderr


def test_standin_training_on_the_cpu_estimates_its_activations_and_needs_a_gpu_when_auto():
    gpu_less = no_gpu()
    from traces.standin.preflight import check_train
    from traces.standin.train import TrainConfig

    default = TrainConfig(shape="mixtral-8x7b", corpus="c", out="o", device="cpu")
    with pytest.raises(UserError, match=r"traces.standin.train \(mixtral-8x7b, hidden 256, batch_tokens 16384\) on "
                                        r"the CPU needs about \d+.\d GB"):
        check_train(default, vocab_size=8192, available=int(24e9))
    tiny = TrainConfig(shape="mixtral-8x7b", corpus="c", out="o", device="cpu", hidden=16, heads=2,
                       batch_tokens=64, context=16)
    check_train(tiny, vocab_size=320, available=int(24e9))
    if gpu_less:
        with pytest.raises(UserError, match="runs on a GPU and this machine has none.*--device cpu"):
            check_train(TrainConfig(shape="mixtral-8x7b", corpus="c", out="o"), vocab_size=320)
