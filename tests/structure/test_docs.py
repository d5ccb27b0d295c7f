"""The README and docs/ stand on their own (issue #16): no pointer to a file outside the repository, and the
first set-up command runs the demo."""

from __future__ import annotations

import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOCS = ["README.md", *sorted(os.path.join("docs", name) for name in os.listdir(os.path.join(REPO, "docs"))
                             if name.endswith(".md"))]
# a relative path in a Markdown link, or a `code` span that looks like a path (``../x``, ``docs/x.md``)
_PATHS = re.compile(r"\]\(([^)#\s]+)[^)]*\)|`(\.\./[^`\s]+)`")


@pytest.mark.parametrize("doc", DOCS)
def test_every_path_a_doc_names_is_inside_the_repository_and_exists(doc):
    with open(os.path.join(REPO, doc), encoding="utf-8") as f:
        text = f.read()
    for match in _PATHS.finditer(text):
        target = match.group(1) or match.group(2)
        if re.match(r"^[a-z]+:", target):  # http:, https:, mailto:
            continue
        resolved = os.path.normpath(os.path.join(REPO, os.path.dirname(doc), target))
        assert resolved.startswith(REPO + os.sep), f"{doc} points outside the repository: {target}"
        assert os.path.exists(resolved), f"{doc} points at a missing file: {target}"


def test_readme_first_set_up_command_runs_the_demo_and_the_second_the_tests():
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        text = f.read()
    section = text.split("## Set-up commands", 1)[1]
    blocks = re.findall(r"```sh\n(.*?)\n```", section, re.S)
    assert blocks[0].strip().endswith("pip install -e . && meshq demo"), blocks[0]
    assert blocks[1].strip().endswith("tox"), blocks[1]


def test_cli_doc_does_not_say_client_commands_need_a_seed():
    with open(os.path.join(REPO, "docs", "cli.md"), encoding="utf-8") as f:
        text = f.read()
    assert "need `--seed`" not in text and "meshq demo" in text


def test_guarantees_do_not_say_rebalancing_is_missing():
    with open(os.path.join(REPO, "docs", "guarantees.md"), encoding="utf-8") as f:
        text = " ".join(f.read().split())
    assert "Rebalancing is not in this release" not in text and "rebalancing is not implemented" not in text
