"""docs/api.md: its Python example runs as written (in a fresh folder, a fresh interpreter)."""

import os
import re
import subprocess
import sys
from pathlib import Path

DOC = Path(__file__).parent.parent / "docs" / "api.md"
TAGS = ("config", "pretrained", "backbone", "knn")


def test_the_documented_example_runs(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) == 1
    script = tmp_path / "example.py"
    script.write_text(blocks[0])
    env_path = str(Path(__file__).parent.parent)
    proc = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": env_path},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = dict(
        line.split(": ", 1) for line in proc.stdout.splitlines() if line.split(":")[0] in TAGS
    )
    assert out["config"].split() == ["tiny", "32", "8", "timm:vit_tiny_patch16_224"]
    assert out["pretrained"].split()[0] == "2"  # two steps
    assert out["backbone"] == "(2, 65, 192) (2, 192)"  # CLS + 8 x 8 patches, 192 wide
    num_train, num_val, top1 = out["knn"].split()
    assert (num_train, num_val) == ("256", "128") and 0 <= float(top1) <= 1
    assert (tmp_path / "api-run" / "summary.json").is_file()
    assert (tmp_path / "api-export" / "model.safetensors").is_file()
