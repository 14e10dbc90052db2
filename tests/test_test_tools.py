"""What a machine without the tests' system tools gets: scripts/test-tools names them in one
line and lets the tests run; each test needing one skips, naming its package (fails under CI)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import require_tool

PACKAGES = ("wrk", "nginx-light", "prometheus", "redis-server")
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "test-tools"


def run_script(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """The script with a PATH of only a shell and `id`: no apt-get, no wrk, no promtool."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("sh", "id"):
        found = shutil.which(tool)
        assert found is not None, f"{tool}: a POSIX system has it"
        (bin_dir / tool).symlink_to(found)
    return subprocess.run(
        [str(bin_dir / "sh"), str(SCRIPT)],
        env={"PATH": str(bin_dir), **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_without_apt_get_the_script_names_what_to_install_in_one_line(tmp_path: Path) -> None:
    result = run_script(tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, lines
    assert "skipped" in lines[0]
    install = lines[0].split("apt-get install ", 1)[1].split()
    # nginx may still be found in /usr/sbin, which the script always searches.
    assert {"wrk", "prometheus", "redis-server"} <= set(install) <= set(PACKAGES)
    assert len(install) == len(set(install))  # prometheus once, for promtool and prometheus


def test_under_ci_a_missing_tool_is_an_error(tmp_path: Path) -> None:
    result = run_script(tmp_path, CI="true")
    assert result.returncode == 1
    assert "apt-get install wrk" in result.stderr


def test_with_every_tool_present_the_script_says_nothing() -> None:
    for tool, package in [("wrk", "wrk"), ("nginx", "nginx-light"), ("promtool", "prometheus")]:
        require_tool(tool, package=package)
    require_tool("prometheus", package="prometheus")
    require_tool("redis-server", package="redis-server")
    result = subprocess.run(
        [str(SCRIPT)], capture_output=True, text=True, timeout=30, check=False, env=os.environ
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_a_missing_tool_skips_the_test_naming_its_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="apt-get install no-such-package"):
        require_tool("no-such-tool", package="no-such-package")


def test_under_ci_a_missing_tool_fails_the_test(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="apt-get install no-such-package"):
        require_tool("no-such-tool", package="no-such-package")


def test_a_tool_off_the_path_in_sbin_is_found(monkeypatch: pytest.MonkeyPatch) -> None:
    nginx = Path("/usr/sbin/nginx")
    if not nginx.exists():
        pytest.skip("nginx is not in /usr/sbin here")
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    assert require_tool("nginx", package="nginx-light") == str(nginx)
