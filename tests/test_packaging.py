"""The install routes stay in sync: pyproject.toml (pip), environment.yml (conda), constraints.txt (pins)."""

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[ ;]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _pyproject_requirements() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in ("notebooks", "test"):
        reqs += project["optional-dependencies"][extra]
    return {_name(r): r.replace(" ", "") for r in reqs}


def _conda_pip_requirements() -> dict[str, str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    deps = env["dependencies"]
    assert "python=3.11" in deps and "pip" in deps
    pip_list = next(d["pip"] for d in deps if isinstance(d, dict) and "pip" in d)
    return {_name(r): r.replace(" ", "") for r in pip_list if not r.startswith("-")}


def test_environment_yml_names_the_same_dependencies():
    py, conda = _pyproject_requirements(), _conda_pip_requirements()
    assert set(conda) == set(py), f"only in environment.yml: {set(conda) - set(py)}; only in pyproject: " \
                                  f"{set(py) - set(conda)}"
    for name, spec in py.items():
        if name != "torch":  # conda pins the CPU-tested torch exactly; pyproject allows a range
            assert conda[name] == spec, f"{name}: environment.yml {conda[name]} vs pyproject {spec}"


def test_constraints_pin_every_dependency_exactly():
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[_name(name)] = version
    for name in _pyproject_requirements():
        assert name in pins, f"{name} is not pinned in constraints.txt"
    assert pins["torch"] == "2.13.0"  # the CPU wheel; a local +cpu tag would not resolve elsewhere
    assert pins["monai"].startswith("1.6.")


def test_makefile_installs_cpu_torch_before_the_rest():
    make = (ROOT / "Makefile").read_text()
    torch_at, rest_at = make.index("--index-url $(TORCH_CPU_INDEX)"), make.index("-c constraints.txt")
    assert torch_at < rest_at  # torch first: installing monai must never pull another build
    assert re.search(r"TORCH_VERSION +\?= 2\.13\.0\b", make)
    assert "TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu" in make.replace("  ", " ")
