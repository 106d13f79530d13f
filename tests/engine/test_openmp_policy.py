"""The OpenMP wait policy fast_inference picks at import: spin briefly on an idle machine, sleep on a busy one."""

import fast_inference


def test_idle_machine_spins_briefly_busy_machine_sleeps(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.setattr(fast_inference, "_busy_fraction", lambda seconds: 0.1)
    assert fast_inference._openmp_wait_policy() == {"GOMP_SPINCOUNT": "20000"}
    monkeypatch.setattr(fast_inference, "_busy_fraction", lambda seconds: 0.9)
    assert fast_inference._openmp_wait_policy() == {"OMP_WAIT_POLICY": "PASSIVE"}
    monkeypatch.setattr(fast_inference, "_busy_fraction", lambda seconds: None)  # no /proc/stat
    assert fast_inference._openmp_wait_policy() == {"OMP_WAIT_POLICY": "PASSIVE"}


def test_the_users_setting_wins(monkeypatch):
    monkeypatch.setattr(fast_inference, "_busy_fraction", lambda seconds: 0.0)
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert fast_inference._openmp_wait_policy() == {}
    monkeypatch.delenv("OMP_WAIT_POLICY")
    monkeypatch.setenv("GOMP_SPINCOUNT", "0")
    assert fast_inference._openmp_wait_policy() == {}


def test_busy_fraction_is_a_fraction():
    busy = fast_inference._busy_fraction(0.01)
    assert busy is None or 0.0 <= busy <= 1.0
