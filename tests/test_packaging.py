"""What a user installs: the wheel's contents and metadata, the console scripts, and the
errors an integration gives without its extra."""
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest

from hapo import bench_entry, integrations

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """A wheel built from a copy of the source tree (the build leaves nothing here)."""
    src = tmp_path_factory.mktemp("src") / "hapo-kernels"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".venv*", ".git", "build", "dist", "*.egg-info", "__pycache__", "out", ".pytest_cache",
        ".hypothesis", ".benchmarks", "hapo_demo_out", ".whl"))
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps",
                    "--no-build-isolation", "-q", "-w", str(dist)], check=True,
                   capture_output=True)
    (path,) = dist.glob("hapo_kernels-*.whl")
    return zipfile.ZipFile(path)


def test_wheel_installs_the_two_packages_and_no_bench(wheel):
    top = {name.split("/")[0] for name in wheel.namelist()}
    dist_info = {t for t in top if t.endswith(".dist-info")}
    assert top - dist_info == {"hapo", "hapo_kernels"}
    names = set(wheel.namelist())
    assert "hapo_kernels/reference.py" in names and "hapo/integrations/trl.py" in names
    assert not any(n.startswith(("bench/", "tests/", "examples/")) for n in names)


def test_wheel_carries_the_license(wheel):
    (info,) = {n.split("/")[0] for n in wheel.namelist() if ".dist-info/" in n}
    meta = wheel.read(f"{info}/METADATA").decode()
    assert "License-Expression: Apache-2.0" in meta
    license_text = wheel.read(f"{info}/licenses/LICENSE").decode()
    assert "Apache License" in license_text and "Version 2.0" in license_text
    assert license_text == (ROOT / "LICENSE").read_text()
    # Extras are ranges (a user's compatible versions stay); CI pins with constraints.txt.
    assert 'Requires-Dist: trl<2,>=1.16; extra == "trl"' in meta
    requirements = [line.split(";")[0] for line in meta.splitlines()
                    if line.startswith("Requires-Dist") and "ruff" not in line]
    assert requirements and not any("==" in r for r in requirements)
    scripts = wheel.read(f"{info}/entry_points.txt").decode()
    assert "hapo-bench = hapo.bench_entry:main" in scripts
    assert "hapo-demo = hapo.demo.__main__:main" in scripts


def test_constraints_pin_what_the_extras_range():
    pins = dict(line.split("==") for line in
                (ROOT / "requirements" / "constraints.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    assert pins["trl"] == "1.16.0" and pins["verl"] == "0.9.1"
    assert pins["liger-kernel"] == "0.8.5"


@pytest.mark.parametrize("module, extra, needs", [
    ("hapo.integrations.trl", "trl", ("trl", "accelerate")),
    ("hapo.integrations.verl", "verl", ("verl",)),
    ("hapo.integrations.verl_trainer", "verl", ("verl",)),
])
def test_integration_without_its_extra_says_how_to_install(module, extra, needs):
    # sys.modules[name] = None makes that import fail, whatever this venv has installed.
    code = "".join(f"import sys; sys.modules[{name!r}] = None\n" for name in needs)
    run = subprocess.run([sys.executable, "-c", code + f"import {module}"],
                         capture_output=True, text=True)
    assert run.returncode != 0
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith(f"ImportError: {module} needs the '{extra}' extra (missing: ")
    assert any(f"(missing: {name})" in last for name in needs)
    assert f'pip install -e ".[{extra}]"' in last
    assert f'"hapo-kernels[{extra}] @ {integrations.GIT_URL}"' in last


def test_hapo_bench_runs_from_the_checkout(capsys):
    assert bench_entry.find_checkout() == ROOT
    with pytest.raises(SystemExit) as stop:
        bench_entry.main(["--help"])
    assert stop.value.code == 0
    assert "hapo-bench" in capsys.readouterr().out


def test_hapo_bench_without_a_checkout_explains(monkeypatch, capsys):
    monkeypatch.setattr(bench_entry, "find_checkout", lambda start=None: None)
    assert bench_entry.main([]) == 2
    err = capsys.readouterr().err
    assert "source checkout" in err and "python -m bench" in err


def test_find_checkout_from_a_directory_inside_it(tmp_path, monkeypatch):
    fake = tmp_path / "clone"
    (fake / "bench").mkdir(parents=True)
    (fake / "bench" / "__main__.py").write_text("")
    (fake / "hapo_kernels").mkdir()
    (fake / "docs").mkdir()
    # From outside an editable install only the directory (or a parent) can tell.
    monkeypatch.setattr(bench_entry, "__file__", str(tmp_path / "site" / "hapo" / "x.py"))
    assert bench_entry.find_checkout(fake / "docs") == fake
    assert bench_entry.find_checkout(tmp_path) is None


def test_versions_agree():
    import hapo
    import hapo_kernels
    assert hapo.__version__ == hapo_kernels.__version__
    assert hapo_kernels.__version__ in (ROOT / "README.md").read_text()   # the changelog
