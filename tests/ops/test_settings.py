"""The kernels' launch settings by name (``model.kernel_settings``): built over the defaults, or refused in one line."""

import pytest

from tttexp.ops.settings import LinearConfig, MLPConfig, kernel_settings


def test_named_settings_over_the_defaults():
    assert kernel_settings("mlp", None) is None
    assert kernel_settings("linear", {}) is None
    assert kernel_settings("mlp", {"split_bwd": True, "local_warps": 4}) == MLPConfig(split_bwd=True, local_warps=4)
    assert kernel_settings("linear", {"split_fwd": None, "every": 4}) == LinearConfig(every=4)


@pytest.mark.parametrize(("layer", "values", "expected"), [
    ("linear", {"split_bwd": True}, "model.kernel_settings.split_bwd: the TTT-Linear kernels have no such setting; "
                                    "they have every, fwd_warps,"),
    ("mlp", {"hc": "32"}, "model.kernel_settings.hc='32': expected int"),
    ("mlp", {"every": True}, "model.kernel_settings.every=True: expected int"),
    ("mlp", {"split_bwd": 1}, "model.kernel_settings.split_bwd=1: expected bool"),
    ("linear", {"scratch": "bf16"}, "model.kernel_settings: scratch is one of 'fp32', 'input', got 'bf16'"),
])
def test_a_wrong_setting_is_refused_in_one_line(layer, values, expected):
    with pytest.raises(ValueError) as err:
        kernel_settings(layer, values)
    assert str(err.value).startswith(expected) and "\n" not in str(err.value)
