"""Text colours of the dashboard meet WCAG AA (4.5:1), computed from app.css itself.

Relative luminance and contrast ratio as WCAG 2.x defines them:
https://www.w3.org/TR/WCAG21/#dfn-relative-luminance and #dfn-contrast-ratio.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

CSS = (
    Path(__file__).resolve().parents[1] / "hero_deployer" / "web" / "static" / "app.css"
).read_text()
AA = 4.5


def luminance(hex_colour: str) -> float:
    value = hex_colour.lstrip("#")
    if len(value) == 3:
        value = "".join(c * 2 for c in value)
    channels = [int(value[i : i + 2], 16) / 255 for i in (0, 2, 4)]
    r, g, b = (c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in channels)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def contrast(a: str, b: str) -> float:
    high, low = sorted((luminance(a), luminance(b)), reverse=True)
    return (high + 0.05) / (low + 0.05)


def variables() -> dict[str, str]:
    root = re.search(r":root\s*{(.*?)}", CSS, re.S)
    assert root is not None
    return dict(re.findall(r"(--[\w-]+):\s*(#[0-9a-fA-F]{3,6})", root.group(1)))


def rules(selector: str) -> list[tuple[str, str]]:
    """(selectors, body) of every rule whose selector mentions `selector`."""
    found = []
    for selectors, body in re.findall(r"([^{}]+){([^{}]*)}", CSS):
        if selector in selectors and "@media" not in selectors:
            found.append((" ".join(selectors.split()), body))
    return found


def colour(body: str, prop: str, names: dict[str, str]) -> str | None:
    match = re.search(rf"(?<![-\w]){prop}:\s*(var\((--[\w-]+)\)|#[0-9a-fA-F]{{3,6}})", body)
    if match is None:
        return None
    return names[match.group(2)] if match.group(2) else match.group(1)


def pairs() -> list[tuple[str, str, str]]:
    names = variables()
    out = []
    for selector in (".badge", "ol.steps li", ".banner", ".flash"):
        for selectors, body in rules(selector):
            ink, ground = colour(body, "color", names), colour(body, "background", names)
            if ink and ground:
                out.append((selectors, ink, ground))
    return out


def test_every_badge_state_and_step_chip_is_checked() -> None:
    checked = " ".join(s for s, _, _ in pairs())
    for state in ("ready", "running", "provisioning", "failed", "stopped"):
        assert f".badge.{state}" in checked, state
    for state in ("done", "current", "failed", "decommissioning", "decommissioned"):
        assert f'data-state="{state}"' in checked, state


@pytest.mark.parametrize(("selectors", "ink", "ground"), pairs())
def test_text_on_its_background_meets_aa(selectors: str, ink: str, ground: str) -> None:
    ratio = contrast(ink, ground)
    assert ratio >= AA, f"{selectors}: {ink} on {ground} is {ratio:.2f}:1"


def test_muted_text_meets_aa_on_the_card_and_the_page() -> None:
    names = variables()
    for ground in ("#ffffff", names["--bg"]):
        assert contrast(names["--muted"], ground) >= AA


def test_the_formula_matches_known_ratios() -> None:
    assert contrast("#000000", "#ffffff") == pytest.approx(21.0)
    assert contrast("#777777", "#ffffff") == pytest.approx(4.48, abs=0.01)  # the classic near-miss
