"""New runs fit the conv blocks the fused score reads by default, when the backbone has them."""

import numpy as np

from ncguard.cli import main
from training.train import DEFAULT_LAYERS
from training.runs import load_run


def test_default_layers_include_the_blocks_the_backbone_has(tmp_path):
    """The MLP has block1 only (its last block is the transfer layer): the default leaves out
    block2 and block3 instead of refusing the run; the cnn keeps all (tests/test_training_cli.py)."""
    assert DEFAULT_LAYERS[:3] == ("block1", "block2", "block3")
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 40)
    x = (rng.normal(size=(3, 12)) * 3)[y] + rng.normal(size=(120, 12))
    np.savez(tmp_path / "vectors.npz", x=x.astype(np.float32), y=y)
    run_dir = tmp_path / "run"
    assert main(["train", "--data", str(tmp_path / "vectors.npz"), "--out", str(run_dir), "--epochs", "2",
                 "--batch-size", "32", "--quiet"]) == 0
    _, config, bundle = load_run(run_dir)
    assert config["settings"]["arch"] == "mlp"
    assert list(bundle.layers) == ["block1", "transfer", "detection"] == config["settings"]["layers"]
