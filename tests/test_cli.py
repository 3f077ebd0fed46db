"""The command lines' shared thread policy and argument checks (hapo/cli.py)."""
import argparse

import pytest

from hapo import cli


@pytest.mark.parametrize("cores, load, want", [
    (2, 0.0, 2), (2, 0.4, 2), (2, 0.6, 1), (2, 1.2, 1), (2, 11.3, 1), (16, 3.0, 13),
    (4, -1.0, 4),
])
def test_default_threads_leaves_the_loaded_cores_alone(cores, load, want):
    assert cli.default_threads(cores, load) == want


def test_default_threads_on_this_machine_is_in_range():
    import os
    assert 1 <= cli.default_threads() <= (os.cpu_count() or 1)


def test_number_types():
    assert cli.positive_int("3") == 3
    for bad in ("0", "-1", "2.5", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            cli.positive_int(bad)
