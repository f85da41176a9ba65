"""Sphinx configuration for the lvmzoo documentation.

Build (warnings are errors)::

    pip install -e ".[docs]"
    python -m sphinx -W --keep-going -b html docs docs/_build/html
"""

import os
import sys

sys.path.insert(0, os.path.abspath(".."))  # the checkout, when lvmzoo is not installed

project = "lvmzoo"
author = "lvmzoo contributors"
copyright = "lvmzoo contributors"

import lvmzoo  # noqa: E402  (after sys.path is set)

release = version = lvmzoo.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",  # Google-style docstrings
    "sphinx.ext.viewcode",
    "myst_parser",  # Markdown pages: the README, docs/writing_models.md, docs/scaling.md
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

# Unresolved cross-references (e.g. to numpy / jax / anndata types in signatures)
# are not warnings: there is no intersphinx mapping.
nitpicky = False

autodoc_default_options = {
    "members": True,
    "member-order": "bysource",
    "show-inheritance": True,
}
autodoc_typehints = "signature"
autodoc_class_signature = "mixed"
autodoc_preserve_defaults = True  # show `jnp.float32` etc. as written, not their repr

napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
# LatentModel's docstring lists the class attributes a subclass sets under this
# heading; render it as a field list like "Args:".
napoleon_custom_sections = [("Class attributes a subclass sets", "params_style")]

# GitHub-style heading anchors, so the README's `[text](#section)` links resolve.
myst_heading_anchors = 3

# No warning categories are suppressed: every warning fails the build (-W).
suppress_warnings = []


# The README (included in readme.md) and docs/*.md link to repository files that
# are not pages of this site (notebooks/*.ipynb, benchmarks/results/*.md). Such a
# link works on GitHub but has no target here; render its text without a link
# rather than warn. Any other unresolved Markdown link still fails the build.
from sphinx.transforms.post_transforms import SphinxPostTransform  # noqa: E402

_REPO = os.path.abspath("..")
_SRC = os.path.abspath(".")


class _RepositoryFileLinks(SphinxPostTransform):
    default_priority = 5  # before myst_parser's resolver (priority 9)

    def run(self, **kwargs):
        from sphinx import addnodes

        for node in list(self.document.findall(addnodes.pending_xref)):
            if node.get("reftype") != "myst":
                continue
            target = node.get("reftarget", "")
            if node.get("refdomain") == "doc":
                if target in self.env.all_docs:
                    continue
                path = target if os.path.isabs(target) else os.path.join(_SRC, target)
                candidates = [path + ".md", path]
            else:
                candidates = [os.path.join(_REPO, target)]
            outside = [c for c in candidates if os.path.exists(c)
                       and not os.path.abspath(c).startswith(_SRC + os.sep)]
            if outside and node.children:
                node.replace_self(node[0].deepcopy())


def setup(app):
    app.add_post_transform(_RepositoryFileLinks)

html_theme = "alabaster"
html_title = f"lvmzoo {release}"
