"""The dependency range in pyproject.toml is the range CI tests: the constraints file CI's first
pass installs pins each package at exactly its declared lower bound, and transformers is capped
below the next untested minor release."""

import re
import tomllib

from tests.helpers import REPO


def _requirements() -> dict[str, str]:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return {re.split(r"[<>=!~ ]", d, maxsplit=1)[0].lower().replace("-", "_"): d for d in deps}


def test_lowest_constraints_equal_the_declared_lower_bounds():
    pins = {}
    for line in (REPO / ".ci/constraints-lowest.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.strip().lower().replace("-", "_")] = version.strip()
    assert set(pins) == {"transformers", "peft", "accelerate", "datasets", "huggingface_hub"}
    requirements = _requirements()
    for name, version in pins.items():
        assert f">={version}" in requirements[name].replace(" ", ""), (name, requirements[name], version)


def test_transformers_is_capped_below_an_untested_minor():
    spec = _requirements()["transformers"].replace(" ", "")
    upper = re.search(r"<(\d+)\.(\d+)(?:,|$)", spec)
    assert upper is not None, f"{spec}: no upper bound on transformers"
    assert int(upper.group(1)) == 5 and int(upper.group(2)) >= 24, spec


def test_every_python_package_is_in_the_wheel():
    """A package missing from [tool.setuptools] packages works in an editable install and is
    absent from a real one."""
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for top in ("finetune", "data_prep")
             for p in (REPO / top).rglob("__init__.py")}
    assert found <= listed, f"packages not in pyproject.toml: {sorted(found - listed)}"
