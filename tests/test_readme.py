"""The README documents every config key, every TensorBoard tag and the commands it promises exist."""
import ast
import re
from pathlib import Path

from core.config import Config, to_dict

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


def tensorboard_tags(path: Path) -> set[str]:
    """The ``"train/..."`` / ``"val/..."`` string literals of a source file; an f-string such as
    ``f"val/dice_{r}"`` gives its literal prefix followed by ``*`` (``val/dice_*``)."""
    tree = ast.parse(path.read_text())
    in_fstrings = {id(part) for node in ast.walk(tree) if isinstance(node, ast.JoinedStr) for part in node.values}
    tags = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in in_fstrings:
            if re.fullmatch(r"(train|val)/\w+", node.value):
                tags.add(node.value)
        elif isinstance(node, ast.JoinedStr) and isinstance(node.values[0], ast.Constant):
            prefix = str(node.values[0].value)
            if re.fullmatch(r"(train|val)/\w*", prefix):
                tags.add(prefix + "*")
    return tags


def test_every_tensorboard_tag_is_documented():
    """The Training outputs paragraph names every tag train.py writes (a per-region tag as e.g.
    `val/dice_<region>`)."""
    tags = tensorboard_tags(ROOT / "train.py") | tensorboard_tags(ROOT / "core" / "logger.py")
    assert {"train/loss", "val/panel", "val/dice_*"} <= tags  # the scan finds them
    outputs = README[README.index("**Outputs** (`out_dir`"):README.index("## Inference")]
    missing = [t for t in sorted(tags) if (f"`{t[:-1]}" if t.endswith("*") else f"`{t}`") not in outputs]
    assert not missing, f"README.md (Training, Outputs) does not list the TensorBoard tags {missing}"


def test_installation_puts_the_cpu_torch_build_first():
    """Read top to bottom, a CPU-only user installs a CPU build of torch (the version .ci/run
    installs) before requirements.txt would pull the CUDA packages."""
    install = README[README.index("## Installation"):README.index("## The two commands")]
    ci_torch = re.search(r"torch==[\d.]+", (ROOT / ".ci" / "run").read_text()).group(0)
    cpu = install.index(f"pip install {ci_torch} ")  # no download host named (the project names none)
    assert cpu < install.index("pip install -r requirements.txt")


def test_example_pictures_exist_and_are_small():
    """The pictures the README shows (infer.py --png, the TensorBoard panel) are in docs/, < 150 kB."""
    linked = set(re.findall(r"\]\((docs/[\w./-]+\.png)\)", README))
    assert {"docs/infer_png.png", "docs/tensorboard_panel.png"} <= linked
    for name in linked:
        path = ROOT / name
        assert path.is_file() and path.stat().st_size < 150_000, name
        assert path.read_bytes().startswith(b"\x89PNG"), name

