"""The README's Python API example runs as written."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_python_api_example_runs():
    section = README.read_text().split("## Python API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    shape, loss = out.stdout.split(") ")
    assert shape == "torch.Size([1, 19, 1024]" and 5.0 < float(loss) < 9.0  # ~ln(1024) at random init


def test_quickstart_has_exactly_two_commands():
    block = README.read_text().split("## Quickstart", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [line for line in block.splitlines() if line.strip()]
    assert len(commands) == 2 and commands[1] == "./test.sh"
    ci = (README.parent / ".ci" / "run").read_text().splitlines()
    assert [line for line in ci if line.startswith("./")] == ["./test.sh"]  # CI calls exactly the README's command
