"""The package as users get it: every public name importable, from a checkout and from a wheel."""
import importlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PUBLIC_MODULES = [
    "graphsurgeon",
    "graphsurgeon.core",
    "graphsurgeon.training",
    "graphsurgeon.methods",
    "graphsurgeon.methods.aggregation",
    "graphsurgeon.methods.structure",
    "graphsurgeon.kernels",
    "graphsurgeon.kernels.heads",
    "graphsurgeon.data",
]


@pytest.mark.parametrize("module", PUBLIC_MODULES)
def test_every_public_name_resolves(module):
    mod = importlib.import_module(module)
    missing = [name for name in mod.__all__ if not hasattr(mod, name)]
    assert not missing, f"{module}.__all__ lists names it does not define: {missing}"


def test_methods_and_aggregators_import_from_the_methods_package():
    from graphsurgeon.methods import DMTG, ITMTL, MTSL, TAG, CAGrad, GradientMethod, Method, PCGrad, SharpnessAware

    assert all(issubclass(m, Method) for m in (DMTG, ITMTL, MTSL, TAG, GradientMethod, SharpnessAware))
    assert PCGrad.__module__ == "graphsurgeon.methods.aggregation.pcgrad" and CAGrad is not None


def test_a_wheel_holds_the_methods_and_kernels_and_imports_every_public_name(tmp_path):
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = tmp_path.glob("graphsurgeon-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for path in ("graphsurgeon/methods/structure/mtsl.py", "graphsurgeon/kernels/heads/dispatch.py", "graphsurgeon/py.typed"):
        assert path in names, f"{path} is not in the wheel"
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = "import importlib\n" + "".join(
        f"m = importlib.import_module({m!r}); assert m.__file__.startswith({str(site)!r}), m.__file__\n"
        f"[getattr(m, n) for n in m.__all__]\n"
        for m in PUBLIC_MODULES
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
