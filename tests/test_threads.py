"""torch's intra-op threads: set once per process to the cores the process may use (runtime.configure_threads)."""

import os

import torch

from isl_core.runtime import configure_threads, usable_cores


def test_threads_follow_the_usable_cores_unless_the_user_chose(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        torch.set_num_threads(1)
        assert usable_cores() == len(os.sched_getaffinity(0))
        assert configure_threads() == usable_cores() == torch.get_num_threads()
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        assert configure_threads() == 1  # the user's OMP_NUM_THREADS wins over the default
        assert configure_threads(2) == 2  # an explicit count wins over both
    finally:
        torch.set_num_threads(before)
