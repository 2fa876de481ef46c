"""The wheel must carry the mapped packages (passes/, targets/, device_profiles/ as d2mc.*)."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_installs_the_mapped_packages(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(ROOT)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("d2mc-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "d2mc/passes/__init__.py" in names and "d2mc/targets/__init__.py" in names
    assert "d2mc/device_profiles/orin-agx.toml" in names and "d2mc/recovery/__init__.py" in names
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = ("import d2mc, d2mc.passes, d2mc.targets, d2mc.device_profiles, d2mc.recovery.run;"
            "from d2mc.profiles import builtin_profiles;"
            f"assert d2mc.__file__.startswith({str(site)!r}), d2mc.__file__;"
            "print(len(builtin_profiles()))")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={"PYTHONPATH": str(site)},
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) >= 7
