"""The environment check that stands before Prefect's server (medseg.runtime.environment)."""

from __future__ import annotations

import pytest

from medseg.runtime import environment
from medseg.runtime.environment import (
    EnvironmentSetupError,
    check_before_local_prefect_server,
    check_prefect_server_can_start,
    stdlib_shadows,
)


def test_the_installed_environment_shadows_no_standard_library_module():
    # nnunetv2 -> batchgenerators -> unittest2 -> the `argparse` backport: the README's set-up removes it, else
    # Prefect's server (uvicorn --app-dir site-packages) imports it and never starts
    assert stdlib_shadows() == []


def test_a_backport_module_or_package_in_site_packages_is_named_with_its_repair(tmp_path):
    (tmp_path / "argparse.py").write_text("# argparse 1.4.0\n")
    (tmp_path / "enum").mkdir()
    (tmp_path / "enum" / "__init__.py").write_text("")
    (tmp_path / "numpy").mkdir()  # not a standard-library name
    (tmp_path / "numpy" / "__init__.py").write_text("")
    (tmp_path / "json").mkdir()  # a folder without __init__.py is no package: nothing to import
    assert stdlib_shadows([tmp_path]) == [tmp_path / "argparse.py", tmp_path / "enum" / "__init__.py"]
    with pytest.raises(EnvironmentSetupError) as raised:
        check_prefect_server_can_start([tmp_path])
    message = str(raised.value)
    assert str(tmp_path / "argparse.py") in message
    assert "pip uninstall -y argparse enum34" in message


def test_the_check_applies_only_where_this_process_would_start_the_server(tmp_path, monkeypatch):
    (tmp_path / "argparse.py").write_text("")
    monkeypatch.setattr(environment, "site_package_dirs", lambda: [tmp_path])
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with pytest.raises(EnvironmentSetupError):
        check_before_local_prefect_server()
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api")  # a real server elsewhere: not our business
    check_before_local_prefect_server()


def test_a_flow_command_line_refuses_to_start_with_the_repair_on_stderr(tmp_path, monkeypatch, capsys):
    pytest.importorskip("prefect")
    from flows import pipeline

    (tmp_path / "argparse.py").write_text("")
    monkeypatch.setattr(environment, "site_package_dirs", lambda: [tmp_path])
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    assert pipeline.main(["--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(tmp_path / "argparse.py") in err and "pip uninstall -y argparse" in err
