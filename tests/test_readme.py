"""Every ```python block of README.md runs as written: on its own (a fresh namespace), in a
temporary directory, on the CPU. A block that cannot run here (a GPU, a long job, data the user
supplies) must say so with a line ``# not run: <reason>``; it is then skipped with that reason."""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
NOT_RUN = re.compile(r"^\s*#\s*not run:\s*(\S.*)$", re.MULTILINE)


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(line number of the opening fence, code) for every ```python block."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        if lines[i].strip() in ("```python", "```py"):
            start, body = i + 1, []
            i += 1
            while i < len(lines) and lines[i].strip() != "```":
                body.append(lines[i])
                i += 1
            blocks.append((start, "\n".join(body) + "\n"))
        i += 1
    return blocks


BLOCKS = python_blocks(README.read_text(encoding="utf-8")) if README.exists() else []


def test_readme_has_python_blocks():
    assert BLOCKS, f"no ```python blocks found in {README}"


@pytest.mark.parametrize("line,code", BLOCKS, ids=[f"README.md:{line}" for line, _ in BLOCKS])
def test_readme_block_runs(line, code, tmp_path, monkeypatch):
    reason = NOT_RUN.search(code)
    if reason:
        pytest.skip(f"README.md:{line}: not run: {reason.group(1).strip()}")
    monkeypatch.chdir(tmp_path)
    import torch

    torch.manual_seed(0)
    namespace = {"__name__": "__readme__"}
    try:
        exec(compile(code, f"README.md:{line}", "exec"), namespace)
    except Exception as e:  # noqa: BLE001 - report which block failed and why, in README terms
        pytest.fail(f"README.md block at line {line} failed: {type(e).__name__}: {e}", pytrace=False)
