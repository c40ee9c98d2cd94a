"""dvc.yaml's dependencies cannot serve a stale result: every stage lists the code it runs and the files it reads.

A stage's code is its module `pipeline/<stage>.py` (named in its `cmd`) and every module of `smearnet` that module
imports, transitively, found statically with `ast`: imports inside functions count, `from smearnet.x import y`
counts `smearnet/x/y.py` when `y` is a module, and importing `smearnet.x.y` runs every package `__init__.py` on the
way. A dependency may be a file or a folder holding it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from conftest import REPO_ROOT

SRC = REPO_ROOT / "src"
PACKAGE = "smearnet"
DVC_YAML = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())
STAGES = DVC_YAML["stages"]
DECODE = "src/smearnet/data/decode.py"
# Stages that ship the package's source with their output, so any source file changes their result: register
# logs the model as an MLflow pyfunc with `code_paths=[src/smearnet]` (smearnet.registry.gate).
PACKAGING_STAGES = {"register"}
# Top-level folders of the files stages read and write; a path literal under one in a stage module must be declared.
DATA_ROOTS = ("data", "reports", "metrics", "models", "checkpoints")


def definition(stage: str) -> dict:
    """A stage's body (a foreach stage's `do`)."""
    return STAGES[stage].get("do", STAGES[stage])


def declared(stage: str, *kinds: str) -> list[str]:
    """The paths under `kinds` (deps, outs, metrics, plots) of a stage, `${item}` left in place."""
    paths = []
    for kind in kinds:
        for entry in definition(stage).get(kind) or []:
            paths += list(entry) if isinstance(entry, dict) else [entry]
    return [str(path).rstrip("/") for path in paths]


def covers(dep: str, path: str) -> bool:
    return path == dep or path.startswith(dep + "/")


def uncovered(paths, deps) -> list[str]:
    return sorted(path for path in paths if not any(covers(dep, path) for dep in deps))


def stage_script(stage: str) -> Path:
    words = [word for word in definition(stage)["cmd"].split() if word.startswith("pipeline/") and word.endswith(".py")]
    assert len(words) == 1, f"stage `{stage}`: expected one pipeline/<stage>.py in its cmd"
    return REPO_ROOT / words[0]


# --- static imports ------------------------------------------------------------------------------------------


def module_file(name: str) -> Path | None:
    """The file of module `name` under src/ (a package's __init__.py), or None when it is not a module there."""
    path = SRC.joinpath(*name.split("."))
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    return None


def imported_names(path: Path, module: str | None) -> set[str]:
    """Every dotted name `path` imports anywhere (functions included); `from a import b` gives `a` and `a.b`."""
    package = (module if path.name == "__init__.py" else (module or "").rpartition(".")[0]).split(".")
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolved against the importing module's package
                base = package[: len(package) - node.level + 1]
                source = ".".join([*base, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            names.add(source)
            names.update(f"{source}.{alias.name}" for alias in node.names if alias.name != "*")
    return names


def source_files(script: Path) -> set[str]:
    """The script and every smearnet module file it imports, transitively, as paths relative to the repository."""
    files, queue, seen = {script}, [(script, None)], set()
    while queue:
        path, module = queue.pop()
        for name in imported_names(path, module):
            parts = name.split(".")
            if parts[0] != PACKAGE:
                continue
            for end in range(1, len(parts) + 1):  # smearnet, smearnet.x, smearnet.x.y: each package runs
                prefix = ".".join(parts[:end])
                found = module_file(prefix)
                if found is not None and prefix not in seen:
                    seen.add(prefix)
                    files.add(found)
                    queue.append((found, prefix))
    return {path.relative_to(REPO_ROOT).as_posix() if path.is_relative_to(REPO_ROOT) else str(path) for path in files}


def test_the_import_scan_follows_function_imports_submodules_and_packages(tmp_path):
    script = REPO_ROOT / "pipeline" / "train.py"
    files = source_files(script)
    # pipeline/train.py imports smearnet.models.training, which imports smearnet.data.loaders inside a function.
    assert {"pipeline/train.py", "src/smearnet/__init__.py", "src/smearnet/models/__init__.py",
            "src/smearnet/models/training.py", "src/smearnet/data/loaders.py"} <= files
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from smearnet.smear import rule\n")
    assert {"src/smearnet/smear/__init__.py", "src/smearnet/smear/rule.py"} <= source_files(probe)


# --- the checks ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_stage_depends_on_the_code_it_runs(stage):
    deps = declared(stage, "deps")
    missing = uncovered(source_files(stage_script(stage)), deps)
    assert not missing, (f"stage `{stage}` runs {missing}, which dvc.yaml does not list (nor a folder holding it) "
                         f"under stages.{stage}.deps: a change there would not re-run `{stage}`")


@pytest.mark.parametrize("stage", sorted(PACKAGING_STAGES))
def test_a_stage_that_packages_the_source_depends_on_all_of_it(stage):
    package = {path.relative_to(REPO_ROOT).as_posix() for path in (SRC / PACKAGE).rglob("*.py")}
    missing = uncovered(package, declared(stage, "deps"))
    assert not missing, f"stage `{stage}` packages src/{PACKAGE} with its output but does not depend on {missing}"


def downstream(stage: str) -> set[str]:
    """Stages that read, directly or through others, what `stage` writes."""
    writes = {name: declared(name, "outs", "metrics", "plots") for name in STAGES}
    reads = {name: declared(name, "deps") for name in STAGES}
    found, frontier = set(), {stage}
    while frontier:
        current = frontier.pop()
        for name in STAGES:
            if name not in found and any(covers(out, dep) or covers(dep, out)
                                         for out in writes[current] for dep in reads[name]):
                found.add(name)
                frontier.add(name)
    return found - {stage}


def test_changing_the_image_decoder_reruns_ingest_and_every_stage_after_it():
    after = downstream("ingest")
    # pretrain reads its own class folders (not the ingested data) through the same decoder, which it lists itself.
    assert after == set(STAGES) - {"generate", "ingest", "pretrain"}, "every stage but generate should come after ingest"
    assert "src/smearnet/data/decode.py" in declared("pretrain", "deps")
    not_rerun = [stage for stage in ["ingest", *sorted(after)] if not uncovered([DECODE], declared(stage, "deps")) == []]
    assert not not_rerun, f"a change to {DECODE} would not re-run {not_rerun}: add it to their deps in dvc.yaml"


def path_literals(script: Path) -> set[str]:
    """String constants in a stage module that name a project file or folder under one of DATA_ROOTS."""
    literals = set()
    for node in ast.walk(ast.parse(script.read_text())):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            text = node.value.strip().rstrip("/")
            if text.split("/")[0] in DATA_ROOTS and " " not in text:
                literals.add(text)
    return literals


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_file_a_stage_names_is_a_declared_dep_or_output(stage):
    declared_paths = [path.split("${")[0].rstrip("/") or path for path in declared(stage, "deps", "outs", "metrics")]
    unknown = sorted(path for path in path_literals(stage_script(stage))
                     if not any(covers(dep, path) or covers(path, dep) for dep in declared_paths))
    assert not unknown, f"stage `{stage}` reads or writes {unknown}, which dvc.yaml does not declare for it"
