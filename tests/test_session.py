"""The test session itself: it leaves nothing in the temporary folder (tests/conftest.py)."""
import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent

INNER = '''
import subprocess, sys, tempfile

def test_writes_like_the_suite(tmp_path, tmp_path_factory):
    (tmp_path / "run").mkdir()
    (tmp_path_factory.mktemp("files") / "teacher.safetensors").write_bytes(b"x")
    # a process the test starts, leaving a folder in the temporary folder as torchrun does (torchelastic_*)
    subprocess.run([sys.executable, "-c", "import tempfile; tempfile.mkdtemp(prefix='torchelastic_')"], check=True)
'''


def test_a_session_leaves_no_folder_in_the_temporary_folder(tmp_path):
    """pytest-of-*, torchelastic_*, torchinductor_*: a passing session takes its temporary files with it."""
    (tmp_path / "test_inner.py").write_text(INNER)
    root = tmp_path / "tmp"
    root.mkdir()
    env = os.environ | {"TMPDIR": str(root), "PYTHONPATH": str(TESTS)}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-p", "no:cacheprovider",
                           "--rootdir", str(tmp_path), str(tmp_path / "test_inner.py")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert list(root.iterdir()) == []
