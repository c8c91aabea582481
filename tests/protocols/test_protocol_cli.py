"""`pbmctl protocol validate` and `pbmd protocol schema`, in-process and as console scripts."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from fixtures.protocols import BASE
from protocol_helpers import edit

from pbmd.daemon.clients import pbmctl
from pbmd.protocols import library

FILES = [str(p) for p in library.protocol_files()]
DOCS = Path(__file__).resolve().parents[2] / "docs" / "protocols.md"
BIN = Path(sys.executable).parent


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = pbmctl.main(argv)
    return code, capsys.readouterr().out


def test_validate_prints_a_plan_for_every_library_file(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(["protocol", "validate", *FILES], capsys)
    assert code == 0
    assert out.count("VALID ") == len(FILES)
    for path in library.protocol_files():
        assert path.stem in out
    for heading in ("λ nm", "mW/cm²", "time", "J/cm²"):
        assert heading in out
    assert "port 4: probe, 905 nm, 0.5 cm²" in out
    assert "session: 50 min 00 s" in out


def test_validate_json(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(["protocol", "validate", "--json", FILES[0]], capsys)
    assert code == 0
    report = json.loads(out)
    assert report["valid"] is True
    (entry,) = report["files"]
    protocol = entry["protocol"]
    assert 45 * 60 <= protocol["session_time_s"] <= 60 * 60
    step = protocol["ports"][0]["steps"][0]
    for key in ("wavelength_nm", "irradiance_mw_cm2", "time_s", "energy_j", "fluence_j_cm2"):
        assert key in step
    assert [p["port"] for p in protocol["ports"]] == [1, 2, 3, 4]


def test_validate_refuses_an_unsafe_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(edit(BASE, "irradiance_mw_cm2 = 10.0", "irradiance_mw_cm2 = 250.0"))
    good = tmp_path / "good.toml"
    good.write_text(BASE)
    code, out = run(["protocol", "validate", str(good), str(bad)], capsys)
    assert code == 1
    assert f"VALID {good}" in out
    assert f"INVALID {bad}" in out
    assert f"{bad}:37: error: ports.1.steps[0].irradiance_mw_cm2" in out
    assert "skin MPE" in out and "fix:" in out
    code, out = run(["protocol", "validate", "--json", str(bad)], capsys)
    assert code == 1
    report = json.loads(out)
    (error,) = report["files"][0]["errors"]
    assert (error["rule"], error["line"]) == ("irradiance-ceiling", 37)
    assert error["allowed"] and error["fix"]


def test_validate_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(["protocol", "validate", str(tmp_path / "nope.toml")], capsys)
    assert code == 1
    assert "cannot read the file" in out


def test_validate_checks_signatures_when_given_a_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = str(library.TEST_KEY_FILE)
    code, out = run(["protocol", "validate", "--key", key, FILES[0]], capsys)
    assert code == 0 and "signed by" in out
    copy = tmp_path / Path(FILES[0]).name
    copy.write_bytes(Path(FILES[0]).read_bytes().replace(b"sessions = ", b"sessions =  "))
    (tmp_path / (copy.name + ".minisig")).write_bytes(Path(FILES[0] + ".minisig").read_bytes())
    code, out = run(["protocol", "validate", "--key", key, str(copy)], capsys)
    assert code == 1 and "signature refused" in out
    unsigned = tmp_path / "unsigned.toml"
    unsigned.write_text(BASE)
    code, out = run(["protocol", "validate", "--key", key, str(unsigned)], capsys)
    assert code == 1 and "no signature file" in out


def test_pbmd_protocol_schema(capsys: pytest.CaptureFixture[str]) -> None:
    from pbmd.daemon import cli

    assert cli.main(["protocol", "schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["additionalProperties"] is False
    assert {"id", "version", "ports", "sites", "evidence"} <= set(schema["properties"])
    assert "Step" in schema["$defs"]


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        pbmctl.main(["protocol", "validate"])
    assert caught.value.code == 2


@pytest.mark.parametrize(
    ("script", "args", "expect"),
    [
        ("pbmctl", ["protocol", "validate", *FILES], "lumbar-facet"),
        ("pbmctl", ["--help"], "protocol"),
        ("pbmd", ["protocol", "schema"], '"$defs"'),
    ],
)
def test_console_scripts(script: str, args: list[str], expect: str) -> None:
    path = BIN / script
    if not path.exists():
        pytest.skip(f"{script} is not installed next to {sys.executable}")
    result = subprocess.run(
        [str(path), *args], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert expect in result.stdout


def test_the_example_in_the_documentation_validates(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = DOCS.read_text(encoding="utf-8")
    example = text.split("```toml\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "lumbar-example.toml"
    path.write_text(example, encoding="utf-8")
    code, out = run(["protocol", "validate", str(path)], capsys)
    assert code == 0, out
    assert "session: 34 min 20 s" in out
    # the annotated example is the test fixture, comments aside
    fixture = Path(__file__).resolve().parent / "v2-example.toml"
    assert tomllib.loads(example) == tomllib.loads(fixture.read_text(encoding="utf-8"))


def test_validate_shows_the_timeline_and_each_dose_source(
    capsys: pytest.CaptureFixture[str],
) -> None:
    fixture = Path(__file__).resolve().parent / "v2-example.toml"
    code, out = run(["protocol", "validate", str(fixture)], capsys)
    assert code == 0, out
    assert "phase 1 'pads': 0:00:00–0:33:20, ports 1" in out
    assert "phase 2 'probe': 0:33:20–0:34:20, ports 4" in out
    assert "0:33:20–0:34:20  port 4  step 1:" in out
    assert "walt-2010: Lumbar spine dose table." in out  # the sources
    assert "port 1 step 1 dose — assumption: No source gives" in out
    assert "port 4 step 1 dose — glazov-2016: Benefit in low-back-pain trials" in out
    assert "; assumption: The trials used other wavelengths" in out
    assert "total Probe energy: 3 J, 1 points — assumption: Example only." in out
    assert "version 1 file" not in out


def test_validate_says_what_a_v1_file_means_in_v2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "base.toml"
    path.write_text(BASE, encoding="utf-8")
    code, out = run(["protocol", "validate", str(path)], capsys)
    assert code == 0, out
    assert "version 1 file, read as version 2: one phase, 'all'" in out
    assert "the probe on port 4 runs while the pads on port 1 run" in out
    assert "phase 1 'all': 0:00:00–0:10:00, ports 1, 4" in out


def test_deeply_nested_input_is_refused_not_crashed_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "deep.toml"
    path.write_text("a = " + "[" * 5000 + "]" * 5000)
    code, out = run(["protocol", "validate", str(path)], capsys)
    assert code == 1 and "nested too deeply" in out
