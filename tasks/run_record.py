"""The run folder's record of a run (names and ids), read by hooks and the API without a server round trip."""

import getpass
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from tasks.home import runs_dir


@dataclass
class RunRecord:
    name: str
    flow_run_id: str
    experiment_id: str
    mlflow_run_id: str

    @property
    def dir(self) -> Path:
        return runs_dir() / self.name

    def save(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "run.json").write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, name: str) -> "RunRecord | None":
        path = runs_dir() / name / "run.json"
        return cls(**json.loads(path.read_text())) if path.exists() else None


def current_user() -> str:
    """Who creates runs: `TESSERA_USER` (an email, as the anchor records), else the login name."""
    return os.environ.get("TESSERA_USER") or getpass.getuser()
