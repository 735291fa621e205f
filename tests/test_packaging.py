"""What an installed msconv ships and says: py.typed, msconv bench outside a source checkout,
benchmark usage lines under their real program name."""
import os
import subprocess
import sys
from pathlib import Path

import msconv
import msconv.cli as cli

ROOT = Path(__file__).resolve().parents[1]


def test_py_typed_is_shipped():
    assert (Path(msconv.__file__).parent / "py.typed").is_file()
    assert '"py.typed"' in (ROOT / "pyproject.toml").read_text()  # package data, so the wheel carries it


def test_bench_without_a_source_tree_says_where_the_benchmarks_are(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "_bench_dir", lambda: str(tmp_path / "bench"))
    assert cli.main(["bench", "transfer", "--quick"]) == 2
    err = capsys.readouterr().err
    assert "not installed with msconv" in err and "source checkout" in err


def test_benchmark_usage_names_the_program():
    env = dict(os.environ, MSCONV_BENCH_RESULTS=os.devnull)
    via_cli = subprocess.run([sys.executable, "-m", "msconv", "bench", "transfer", "--help"], capture_output=True,
                             text=True, cwd=ROOT, env=env, timeout=120)
    assert via_cli.returncode == 0 and via_cli.stdout.startswith("usage: msconv bench transfer "), via_cli.stdout[:200]
    direct = subprocess.run([sys.executable, "bench/bench_mge.py", "--help"], capture_output=True, text=True, cwd=ROOT,
                            env=env, timeout=120)
    assert direct.returncode == 0 and direct.stdout.startswith("usage: python bench/bench_mge.py "), direct.stdout[:200]
