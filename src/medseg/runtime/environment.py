"""Is this Python environment fit to run Prefect's server? One known way it is not: a standard-library shadow.

nnunetv2 depends on batchgenerators, which depends on unittest2, which depends on the Python 2 backport `argparse`
(1.4.0): pip installs it as `site-packages/argparse.py`. Nothing imports it while the standard library comes first
on `sys.path`, but Prefect starts its server as `python -m uvicorn --app-dir <site-packages>`, which puts
site-packages first: the backport then replaces the standard `argparse`, pydantic-settings fails to import
(`BooleanOptionalAction`), and every flow run ends in "Timed out while attempting to connect to ephemeral Prefect
API server". `pip uninstall -y argparse` is the cure: batchgenerators never imports unittest2.
"""

from __future__ import annotations

import os
import site
import sys
from pathlib import Path

from medseg.errors import MedsegError

# top-level names that stdlib-only backports install into site-packages (never wanted on Python 3)
_BACKPORTS = {"argparse": "argparse", "enum": "enum34", "typing": "typing", "dataclasses": "dataclasses"}


class EnvironmentSetupError(MedsegError):
    """The installed packages break a tool medseg runs (with the command that repairs them)."""


def site_package_dirs() -> list[Path]:
    dirs = [*site.getsitepackages(), site.getusersitepackages()]
    return [Path(d) for d in dict.fromkeys(dirs) if Path(d).is_dir()]


def stdlib_shadows(dirs: list[Path] | None = None) -> list[Path]:
    """Modules or packages in site-packages that carry a standard-library module's name."""
    found = []
    for folder in site_package_dirs() if dirs is None else dirs:
        for name in sorted(sys.stdlib_module_names):  # Python >= 3.10, as the project requires
            for candidate in (folder / f"{name}.py", folder / name / "__init__.py"):
                if candidate.is_file():
                    found.append(candidate)
    return found


def check_prefect_server_can_start(dirs: list[Path] | None = None) -> None:
    """Refuse, naming the file and the fix, where Prefect's server would import a shadow instead of the stdlib."""
    shadows = stdlib_shadows(dirs)
    if not shadows:
        return
    names = sorted({p.stem if p.name != "__init__.py" else p.parent.name for p in shadows})
    distributions = " ".join(_BACKPORTS.get(n, n) for n in names)
    listed = "\n".join(f"  {p}" for p in shadows)
    raise EnvironmentSetupError(
        f"these files in site-packages carry a standard-library module's name:\n{listed}\n"
        "Prefect's server puts site-packages ahead of the standard library, so it would import them and fail to "
        f"start. Remove them with `{Path(sys.executable).name} -m pip uninstall -y {distributions}` (the argparse "
        "backport comes with nnunetv2 through batchgenerators -> unittest2 and is never used on Python 3).")


def check_before_local_prefect_server() -> None:
    """The check, where this process would start Prefect's temporary server (no PREFECT_API_URL to a real one)."""
    if not os.environ.get("PREFECT_API_URL"):
        check_prefect_server_can_start()
