"""What a Hugging Face Space needs: the README header of the Gradio Space, the Dockerfile of the
Streamlit (Docker) Space, and requirements split into run time and tests.

`docker build` cannot run here (no Docker, no network), so these tests read the files: the
Dockerfile's command must start the same app the README names, on the port the Space expects.
"""

from __future__ import annotations

import ast
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
RUNTIME_SOURCES = [ROOT / "app.py", *sorted((ROOT / "views").glob("*.py")), *sorted((ROOT / "d2dpm").rglob("*.py")),
                   *sorted((ROOT / "d2dpm_app").glob("*.py"))]
TEST_ONLY = {"pytest", "playwright"}


def requirement_names(path: Path) -> dict[str, str]:
    """name → specifier of each requirement line (options and comments skipped)."""
    found = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        name = re.split(r"[=<>!~\[ ]", line, maxsplit=1)[0].lower().replace("_", "-")
        found[name] = line[len(name):]
    return found


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            rows.append((word.upper(), rest.strip()))
    return rows


def test_the_readme_header_is_a_valid_gradio_space_configuration():
    text = (ROOT / "README.md").read_text()
    assert text.startswith("---\n")
    header = yaml.safe_load(text.split("---\n")[1])
    assert header["sdk"] == "gradio"  # the Space SDKs Hugging Face lists: gradio, docker, static
    assert (ROOT / header["app_file"]).is_file()
    assert header["sdk_version"] == requirement_names(ROOT / "requirements.txt")["gradio"].lstrip("=")
    assert str(header["python_version"]).startswith("3.")
    assert len(header["short_description"]) <= 60


def test_the_dockerfile_serves_the_streamlit_app_the_readme_names_on_port_8501():
    instructions = dockerfile_instructions()
    commands = [args for word, args in instructions if word == "CMD"]
    assert len(commands) == 1
    argv = json.loads(commands[0])  # exec form: signals reach Streamlit
    readme = (ROOT / "README.md").read_text()
    assert "streamlit run app.py" in readme
    assert argv[:3] == ["streamlit", "run", "app.py"]
    options = dict(zip(argv[3::2], argv[4::2]))
    assert options["--server.port"] == "8501" and options["--server.address"] == "0.0.0.0"
    assert ("EXPOSE", "8501") in instructions
    assert "app_port: 8501" in readme and "sdk: docker" in readme
    # the base image's Python is one the README says is supported
    base = next(args for word, args in instructions if word == "FROM")
    version = re.search(r"python:(\d+\.\d+)", base).group(1)
    assert f"tested on {version}" in readme


def test_the_dockerfile_installs_the_cpu_build_of_torch_before_the_requirements():
    runs = [args for word, args in dockerfile_instructions() if word == "RUN"]
    pip = " && ".join(runs)
    cpu = pip.index("download.pytorch.org/whl/cpu")
    torch_pin = requirement_names(ROOT / "requirements.txt")["torch"]
    assert f"torch{torch_pin}" in pip[cpu:]
    assert pip.index("-r requirements.txt") > cpu


def test_requirements_hold_what_the_app_runs_and_the_tests_theirs():
    runtime = requirement_names(ROOT / "requirements.txt")
    tests = requirement_names(ROOT / "requirements-test.txt")
    assert not TEST_ONLY & set(runtime), "test-only packages in requirements.txt"
    assert TEST_ONLY <= set(tests)
    assert all(spec.startswith("==") for spec in runtime.values()), runtime  # pinned: torch unpinned pulls CUDA
    assert "requirements-test.txt" in (ROOT / "scripts" / "test.sh").read_text()
    # no run-time module imports a test-only package
    for path in RUNTIME_SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not {n.split(".")[0] for n in names} & TEST_ONLY, f"{path.relative_to(ROOT)} imports a test-only package"


@pytest.mark.parametrize("name", ["gradio", "streamlit", "torch", "diffusers", "plotly", "pandas", "pillow"])
def test_every_package_the_app_imports_is_a_runtime_requirement(name):
    assert name in requirement_names(ROOT / "requirements.txt")


def test_the_readme_says_how_to_get_cpu_torch_and_which_python():
    readme = (ROOT / "README.md").read_text()
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in readme
    assert re.search(r"Python\*?\*?:? 3\.10 or newer", readme)
    command = shlex.split(re.search(r"pip install -r requirements.txt && (python app.py)", readme).group(1))
    assert command == ["python", "app.py"]
