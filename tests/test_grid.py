"""grid_scale: nesting, restoration on error, per-thread values, torch.compile guards."""
import threading

import pytest
import torch

import msconv


def test_default_and_nesting():
    assert msconv.current_grid_scale() == 1.0
    with msconv.grid_scale(2) as s:
        assert s == 2.0 and msconv.current_grid_scale() == 2.0
        with msconv.grid_scale(0.25):
            assert msconv.current_grid_scale() == 0.25
        assert msconv.current_grid_scale() == 2.0
    assert msconv.current_grid_scale() == 1.0


def test_restored_after_exception():
    with pytest.raises(RuntimeError):
        with msconv.grid_scale(4.0):
            raise RuntimeError("boom")
    assert msconv.current_grid_scale() == 1.0


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf")])
def test_bad_values(bad):
    with pytest.raises(ValueError, match="grid_scale: s must be finite and > 0"):
        with msconv.grid_scale(bad):
            pass


@pytest.mark.parametrize("bad", ["2", None, True, torch.tensor(2.0)])
def test_bad_types(bad):
    with pytest.raises(TypeError, match="grid_scale: s must be a positive number"):
        with msconv.grid_scale(bad):
            pass


def test_per_thread():
    seen = {}
    barrier = threading.Barrier(2)

    def worker(name, s):
        with msconv.grid_scale(s):
            barrier.wait()  # both threads are inside their own context now
            seen[name] = msconv.current_grid_scale()

    ts = [threading.Thread(target=worker, args=(n, s)) for n, s in (("a", 2.0), ("b", 0.5))]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert seen == {"a": 2.0, "b": 0.5}
    assert msconv.current_grid_scale() == 1.0


def test_compile_sees_each_scale():
    compiles = []

    def backend(gm, example_inputs):
        compiles.append(gm)
        return gm

    @torch.compile(backend=backend, fullgraph=True)
    def f(x):
        return x * msconv.current_grid_scale()

    x = torch.ones(3)
    assert f(x).tolist() == [1.0] * 3
    with msconv.grid_scale(2.0):
        assert f(x).tolist() == [2.0] * 3
    assert f(x).tolist() == [1.0] * 3
    assert len(compiles) == 2  # one graph per distinct scale, reused when it comes back
    with msconv.grid_scale(4.0):
        assert f(x).tolist() == [4.0] * 3
    assert len(compiles) == 3

