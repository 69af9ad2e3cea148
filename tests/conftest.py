"""Shared fixtures. The repo root is put on sys.path so tests import the packages directly."""
import socket
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="module")
def one_thread():
    """One torch intra-op thread while a module runs: its networks are tiny, and two threads spin-wait
    badly when other processes share the cores (``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for torchrun and TCP stores)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def unwritable(tmp_path):
    """``(folder, reason)``: a folder where no file can be created. A read-only folder (chmod 0o500)
    or, where that does not stop writes (root), a folder below a file of the same name as a parent."""
    folder = tmp_path / "readonly"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        (folder / "probe").write_bytes(b"")
    except PermissionError:
        yield folder, "Permission denied"
        folder.chmod(0o700)
        return
    (folder / "probe").unlink()
    folder.chmod(0o700)
    (tmp_path / "blocker").write_text("a file, not a folder")
    yield tmp_path / "blocker" / "out", "a file of that name is in the way"
