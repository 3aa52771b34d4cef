import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

# the project is a set of flat modules at the repository root
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Everything this session writes to the temporary folder goes into one folder of its own: pytest's tmp_path folders,
# and what the processes the tests start leave there (torchrun's torchelastic_*, torch.compile's torchinductor_*).
# It is removed at the end when every test passed (or nothing was written); after a failure it is kept, with the
# failed tests' folders (pytest.ini).
SESSION_TMP = Path(tempfile.mkdtemp(prefix="kdad-tests-"))
os.environ["TMPDIR"] = tempfile.tempdir = str(SESSION_TMP)
os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(SESSION_TMP / "torchinductor")


def pytest_sessionfinish(session, exitstatus):
    if exitstatus == 0 or not any(p.is_file() for p in SESSION_TMP.rglob("*")):
        shutil.rmtree(SESSION_TMP, ignore_errors=True)
    else:
        print(f"\nthe temporary files of this session, the failed tests' included, are kept in {SESSION_TMP}")


@pytest.fixture(autouse=True)
def seeded():
    """Every test starts from the same global random state, so its figures repeat exactly (a test that uses torch
    has imported it by now; the rest need not wait for it)."""
    if "torch" in sys.modules:
        sys.modules["torch"].manual_seed(0)
