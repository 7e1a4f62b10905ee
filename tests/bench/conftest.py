"""What the tests of bench/ share: the matmul peak, which a script measures at its start (2048^3 x 21 FLOPs on a
CPU: ~3 s on 2 idle cores, 15 s on busy ones), measured once per session and reused by every later script."""

import pytest

from bench import timing

PEAKS = {}  # (device type, dtype) -> FLOP/s, measured by the first test that asks


@pytest.fixture(autouse=True)
def matmul_peak_once(monkeypatch):
    measure = timing.matmul_peak

    def once(device, dtype):
        if (device.type, dtype) not in PEAKS:
            PEAKS[device.type, dtype] = measure(device, dtype)
        return PEAKS[device.type, dtype]

    monkeypatch.setattr(timing, "matmul_peak", once)
