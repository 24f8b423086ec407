"""Documentation that must not drift from the code."""

from __future__ import annotations

import os
import re
from pathlib import Path

import attrs

from slmkit import hookspecs
from slmkit.config import schema as experiment

ROOT = Path(__file__).resolve().parent.parent


def spec_names() -> list[str]:
    return [name for name in dir(hookspecs) if hasattr(getattr(hookspecs, name), "slmkit_spec")]


def test_every_hook_spec_has_a_docstring_and_a_section_in_docs() -> None:
    headings = set(re.findall(r"^### (\w+)$", (ROOT / "docs" / "hooks.md").read_text(), re.M))
    assert len(spec_names()) == 14
    for name in spec_names():
        assert getattr(hookspecs, name).__doc__, name
        assert name in headings, f"docs/hooks.md has no section for {name}"


def test_every_experiment_key_is_in_the_reference() -> None:
    reference = (ROOT / "docs" / "experiments.md").read_text()
    for cls in (
        experiment.ExperimentSection, experiment.PluginsSection, experiment.DataSection,
        experiment.TokenizerSection, experiment.ModelSection, experiment.OptimizerSection,
        experiment.ScheduleSection, experiment.TrainingSection, experiment.SamplingSection,
        experiment.ForwardHookSection, experiment.NamedSection, experiment.ProbeSection,
    ):  # fmt: skip
        for field in attrs.fields(cls):
            if field.name not in ("options", "component"):
                assert f"`{field.name}`" in reference, f"{cls.__name__}.{field.name}"


def test_readme_shows_the_two_setup_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "uv run slmkit run experiments/baseline.toml" in readme
    assert "uv run pytest" in readme


def test_local_links_and_pictures_in_the_docs_exist() -> None:
    for page in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target:
                continue
            assert (page.parent / target).exists(), f"{page.name} links to missing {target}"


def test_no_file_holds_a_merge_conflict_marker() -> None:
    """A hand merge once left ``<<<<<<<``/``=======``/``>>>>>>>`` lines in bench/RESULTS.md."""
    marker = re.compile(r"^(<{7}|>{7}) |^={7}$", re.M)
    suffixes = {".md", ".py", ".toml", ".txt", ".cfg", ".yml", ".yaml", ".json"}
    for folder, subfolders, files in os.walk(ROOT):
        subfolders[:] = [d for d in subfolders if not d.startswith(".") and d != "runs"]
        for name in files:
            path = Path(folder) / name
            if path.suffix in suffixes:
                found = marker.search(path.read_text(errors="replace"))
                assert found is None, f"{path.relative_to(ROOT)}: {found.group(0)!r}"
