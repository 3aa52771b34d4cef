import sys
from pathlib import Path

import pytest
import torch

# the project is a set of flat modules at the repository root
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@pytest.fixture(autouse=True)
def seeded():
    """Every test starts from the same global random state, so its figures repeat exactly."""
    torch.manual_seed(0)
