"""The repository's promised shape: three thin trainer scripts on one shared package, which run from a clone as they
are (from any working folder, without installing anything), and share no copied code."""

import ast
import itertools
import subprocess
import sys

import pytest
from testing_utils import ROOT, TRAINERS


SCRIPTS = sorted(ROOT.glob("train_diffusion_dpo*.py"))
# The package held about 2,960 lines once shared; what issues 21-23 added for every family since (Flux hooks, 4-bit
# base, run health, soft labels, Hub failure handling) brought it to 3,198: 3,200 is the budget until it is split.
SCRIPT_LINES, PACKAGE_LINES = 900, 3200


def definitions(path):
    """{name: the AST of its body without the docstring} of every top-level function and class of a file."""
    bodies = {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            body = node.body[1:] if ast.get_docstring(node) is not None else node.body
            bodies[node.name] = ast.dump(ast.Module(body=body, type_ignores=[]))
    return bodies


def test_every_script_is_tested():
    assert {path.stem for path in SCRIPTS} == {module.__name__ for module in TRAINERS.values()}


def test_scripts_and_package_stay_within_their_size():
    for script in SCRIPTS:
        assert len(script.read_text().splitlines()) <= SCRIPT_LINES, script.name
    package = sum(len(path.read_text().splitlines()) for path in (ROOT / "diffusion_dpo").glob("*.py"))
    assert package <= PACKAGE_LINES


def test_no_function_or_class_body_is_copied_between_scripts():
    """What two scripts would share belongs in diffusion_dpo/ (a copy drifts): no top-level function or class of
    one script has the same body (docstrings aside) as one of another."""
    bodies = {script.name: definitions(script) for script in SCRIPTS}
    for (first, first_bodies), (second, second_bodies) in itertools.combinations(bodies.items(), 2):
        copied = [
            f"{first}:{a} = {second}:{b}"
            for a, body in first_bodies.items()
            for b, other in second_bodies.items()
            if body == other
        ]
        assert not copied, copied


@pytest.mark.parametrize("script", SCRIPTS, ids=[script.stem for script in SCRIPTS])
def test_a_script_runs_from_any_folder_without_installing_the_package(script, tmp_path):
    """`python path/to/train_diffusion_dpo.py` finds diffusion_dpo/ beside it, wherever it is run from."""
    result = subprocess.run(
        [sys.executable, str(script), "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--beta_dpo" in result.stdout
