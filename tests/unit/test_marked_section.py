"""README sections generated from records: replaced between markers, atomically, refusing bad markers."""

from pathlib import Path

import pytest

from vtrlab.io import replace_marked_section

ROOT = Path(__file__).resolve().parents[2]


def test_replaces_only_between_markers(tmp_path):
    p = tmp_path / "README.md"
    p.write_text("head\n<!-- s:begin -->\nold\n<!-- s:end -->\ntail\n")
    replace_marked_section(p, "s", "new 1.23\n")
    assert p.read_text() == "head\n<!-- s:begin -->\nnew 1.23\n<!-- s:end -->\ntail\n"
    replace_marked_section(p, "s", "again")  # idempotent shape: markers stay, once each
    assert p.read_text().count("<!-- s:begin -->") == 1 and "again" in p.read_text() and "new" not in p.read_text()


@pytest.mark.parametrize(
    "doc",
    ["no markers\n", "<!-- s:end -->\n<!-- s:begin -->\n", "<!-- s:begin -->\n<!-- s:begin -->\n<!-- s:end -->\n"],
)
def test_bad_markers_are_refused_and_file_untouched(tmp_path, doc):
    p = tmp_path / "README.md"
    p.write_text(doc)
    with pytest.raises(ValueError, match="s:begin"):
        replace_marked_section(p, "s", "x")
    assert p.read_text() == doc


def test_readme_organism_section_matches_the_bundle_records():
    """The numbers the README states about the organism are the bundle's (regenerate with
    `vtrlab organism card --readme README.md` after retraining)."""
    from vtrlab.organism.card import readme_summary

    doc = (ROOT / "README.md").read_text()
    section = doc.split("<!-- organism-summary:begin -->")[1].split("<!-- organism-summary:end -->")[0]
    assert section.strip() == readme_summary(ROOT / "data" / "models" / "organism").strip()
