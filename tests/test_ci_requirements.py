"""Tests whose requirement is missing (Slurm, the MiniLM package, ../shared/data) skip on a laptop and fail in
CI (``.ci/run`` exports ``CI=true``), where a skip would hide that they never ran."""

import pytest

from tests.conftest import ROOT, in_ci, skip_or_fail


@pytest.mark.parametrize("value", ["true", "1", "yes", "True"])
def test_in_ci_a_missing_requirement_fails_naming_it(monkeypatch, value):
    monkeypatch.setenv("CI", value)
    assert in_ci()
    with pytest.raises(pytest.fail.Exception) as failed:
        skip_or_fail("slurm: not installed: to get it: ...")
    why = f"(CI={value!r}: in CI a missing requirement fails, not skips)"
    assert str(failed.value) == f"slurm: not installed: to get it: ... {why}"


@pytest.mark.parametrize("value", [None, "", "0", "false", "no"])
def test_outside_ci_a_missing_requirement_skips(monkeypatch, value):
    if value is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", value)
    assert not in_ci()
    with pytest.raises(pytest.skip.Exception, match="^SST-2 is not at x$"):
        skip_or_fail("SST-2 is not at x")


def test_ci_script_sets_ci():
    """The project's CI entry exports CI=true unless the CI service already set it, before the tests run."""
    lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert "export CI=${CI:-true}" in lines
    assert lines.index("export CI=${CI:-true}") < next(i for i, ln in enumerate(lines) if "pytest" in ln)


def test_every_requirement_gate_goes_through_skip_or_fail():
    """No test skips on its own: every gate (Slurm, MiniLM, the shared data) goes through skip_or_fail, which
    fails under CI. Only the GPU tests (never run by CI) may skip plainly."""
    for path in sorted((ROOT / "tests").rglob("*.py")):
        if path.parent.name == "gpu":
            continue
        text = path.read_text()
        if path.name == "test_ci_requirements.py":
            continue  # names the forbidden calls
        assert "pytest.skip(" not in text.replace("pytest.skip(missing)", ""), path
        assert "importorskip" not in text, path
        assert "skipif" not in text, path
