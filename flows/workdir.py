"""The deployments' pull step: run in the s2v-batch checkout of the worker, found when the run starts.

`prefect deploy` fills `{{ $VAR }}` in prefect.yaml with the deploying machine's environment,
so `set_working_directory: {{ $S2V_PROJECT_DIR }}` stored the deployer's own folder. This
step takes no argument: on the worker it reads S2V_PROJECT_DIR (the image sets /opt/s2v), else
uses the folder the installed package lives in (a process worker's checkout).
"""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_DIR_ENV = "S2V_PROJECT_DIR"


def project_dir() -> dict[str, str]:
    """Change to the project folder; returns it as the step's `directory` output (Prefect changes to it too)."""
    folder = os.environ.get(PROJECT_DIR_ENV) or str(Path(__file__).resolve().parents[1])
    if not (Path(folder) / "flows").is_dir():
        raise FileNotFoundError(f"{folder} is not an s2v-batch checkout (no flows/ folder); set {PROJECT_DIR_ENV} "
                                "on the worker to the folder holding prefect.yaml")
    os.chdir(folder)
    return {"directory": folder}
