import sys
from pathlib import Path

# the project is a set of flat modules at the repository root
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
