"""`tokenmorph compare`: two objectives trained and evaluated the same way, side by side."""

import json

from .helpers import run_cli


def test_compare_dtm_vs_tokenwise(photo_dir, class_tree, tmp_path):
    tokenwise = tmp_path / "smoke-tokenwise.yaml"
    tokenwise.write_text("base: smoke\nscheduler: none\n")
    out = tmp_path / "cmp"
    args = [
        "compare",
        "--configs",
        "smoke",
        str(tokenwise),
        "--output-dir",
        str(out),
        "--data",
        str(photo_dir),
        "--eval-train",
        str(class_tree / "train"),
        "--eval-val",
        str(class_tree / "val"),
        "max_steps=2",
        "--probe-epochs",
        "5",
        "--loss-images",
        "12",
    ]
    proc = run_cli(*args)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    rows = {r["config"]: r for r in result["runs"]}
    assert set(rows) == {"smoke", "smoke-tokenwise"}
    assert (
        rows["smoke"]["objective"].startswith("DTM")
        and rows["smoke-tokenwise"]["objective"] == "token-wise"
    )
    for r in rows.values():
        assert r["steps"] == 2 and r["num_train"] == 24 and r["num_val"] == 12
        assert (
            0 <= r["knn_top1"] <= 1 and 0 <= r["linear_top1"] <= 1 and r["heldout_token_loss"] > 0
        )
    assert "| smoke-tokenwise | token-wise |" in (out / "compare.md").read_text()
    assert (out / "compare_curves.png").exists()
    # a finished comparison is not trained again
    again = run_cli(*args)
    assert again.stdout.count("already trained") == 2
