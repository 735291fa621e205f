"""`msconv bench`: every benchmark's main(argv) returns an exit code, `bench all` runs them all."""
import csv
import os

import pytest

from msconv.cli import _bench_names, main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")


@pytest.fixture
def results(tmp_path, monkeypatch):
    """Benchmark CSVs into tmp_path (the committed bench/results stay untouched)."""
    import importlib
    import sys

    monkeypatch.setenv("MSCONV_BENCH_RESULTS", str(tmp_path))
    monkeypatch.syspath_prepend(BENCH)
    for name in [n for n in sys.modules if n == "_common" or n.startswith("bench_")]:
        monkeypatch.delitem(sys.modules, name)  # re-read RESULTS from the environment
    importlib.invalidate_caches()
    return tmp_path


def test_bench_all_smoke_runs_every_benchmark_and_writes_the_shared_columns(results, capsys):
    assert main(["bench", "all", "--quick", "--smoke"]) == 0
    written = sorted(os.listdir(results))
    for name in _bench_names(BENCH):
        mine = [f for f in written if f.startswith(name + "_") and f.endswith(".csv")]
        assert mine, f"bench_{name} wrote no CSV into {results} ({written})"
        with open(results / mine[0], newline="") as fh:
            rows = list(csv.DictReader(fh))
        assert rows and {"device", "torch", "msconv", "git"} <= set(rows[0]), name
    timed = [f for f in written if f.startswith(("transfer_", "mfconv_", "mf_jets_")) and f.endswith(".csv")]
    for f in timed:
        with open(results / f, newline="") as fh:
            assert {"p50_ms", "p20_ms", "p80_ms"} <= set(next(csv.DictReader(fh))), f


def test_a_main_that_returns_no_exit_code_is_an_error_that_does_not_stop_the_others(results, tmp_path, capsys,
                                                                                    monkeypatch):
    fake = tmp_path / "benches"
    fake.mkdir()
    (fake / "bench_rows.py").write_text("def main(argv=None):\n    return [{'p50_ms': 1.0}]\n")
    (fake / "bench_zzz.py").write_text("RAN = []\ndef main(argv=None):\n    RAN.append(argv)\n    return 0\n")
    monkeypatch.setattr("msconv.cli._bench_dir", lambda: str(fake))
    assert main(["bench", "all", "--quick"]) == 1
    err = capsys.readouterr().err
    assert "bench_rows.py main() returned a list, not an exit code" in err and "failed: rows (exit 1)" in err
    import bench_zzz

    assert bench_zzz.RAN == [["--quick"]]
    assert main(["bench", "zzz"]) == 0
    assert main(["bench", "nope"]) == 2
