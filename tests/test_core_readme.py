"""README.md shows the two commands and the PV table exactly as ptychostream.pvnames defines it."""

from pathlib import Path

from ptychostream.pvnames import markdown_table

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_pv_table_is_the_code_table():
    assert markdown_table() in README.read_text(), (
        "README.md's PV table is stale: paste `python -m ptychostream.pvnames` into it"
    )


def test_readme_gives_the_two_commands():
    text = README.read_text()
    assert "make demo" in text and "make test" in text
