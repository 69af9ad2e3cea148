"""The README documents every config key and the commands it promises exist."""
from pathlib import Path

from engine.config import Config, to_dict

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def dotted_keys(tree: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in tree.items():
        if isinstance(value, dict):
            keys += dotted_keys(value, f"{prefix}{key}.")
        else:
            keys.append(f"{prefix}{key}")
    return keys


def test_every_config_key_is_documented():
    missing = [k for k in dotted_keys(to_dict(Config())) if f"`{k}`" not in README]
    assert not missing, f"README.md does not document: {missing}"


def test_commands_and_configs_exist():
    assert "python -m pytest -q" in README
    assert "python train.py -c configs/demo.yaml" in README
    for name in ("demo", "unet3d", "swin_unetr", "unet3d_tiny", "swin_unetr_tiny"):
        assert (ROOT / "configs" / f"{name}.yaml").is_file()
        assert f"{name}.yaml" in README
