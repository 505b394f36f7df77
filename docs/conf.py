"""Sphinx configuration: the API reference and the guides of omerge_jax.

``make docs`` builds it with warnings as errors, then runs docs/check_api.py.
The build reaches no network: no intersphinx inventory is fetched, MathJax
comes from the ``sphinx-mathjax-offline`` wheel, and a page that would load a
script, style sheet or font from another host fails the build.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))
# Importing omerge_jax imports JAX; the docs need no accelerator (libtpu may be installed).
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import omerge_jax  # noqa: E402

project = "omerge_jax"
author = "the omerge_jax authors"
copyright = "the omerge_jax authors"  # noqa: A001
release = version = omerge_jax.__version__

extensions = [
  "sphinx.ext.autodoc",
  "sphinx.ext.autosummary",
  "sphinx.ext.napoleon",
  "sphinx.ext.mathjax",
  # MathJax 3.2.2 (es5 build, woff fonts) from a wheel, copied to _static/mathjax.
  "sphinx-mathjax-offline",
  "myst_parser",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
# Fenced blocks without a language: highlighted as Python if they parse, else plain.
highlight_language = "default"

# --- Cross-references -----------------------------------------------------------
# The docstrings write `omerge_jax.consensus`, `MergeStats`, ... : single
# backticks are Python object references.
default_role = "py:obj"
# Every reference into omerge_jax must resolve: a renamed, private or
# undocumented target fails the build. References to other libraries and to
# builtins (annotations such as jax.Array, optax.Params, int) cannot resolve
# offline (no intersphinx): those alone are ignored.
nitpicky = True
_EXTERNAL = (
  "jax jaxlib jnp lax optax chex flax nnx orbax ocp np numpy typing collections numbers builtins"
)
_BUILTINS = (
  "None bool int float complex str bytes tuple list dict Any Callable Sequence Mapping Iterable"
  " NamedTuple Optional Union ValueError TypeError"
)
nitpick_ignore_regex = [
  (r"py:.*", rf"({'|'.join(_EXTERNAL.split())})(\..+)?"),
  (r"py:.*", rf"({'|'.join(_BUILTINS.split())})"),
]

# --- autodoc, napoleon --------------------------------------------------------------
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_typehints_format = "short"
# The annotations are strings (``from __future__ import annotations``): show
# the names of Optax's and JAX's aliases, as the code writes them, rather than
# the unions they stand for (optax.Params, ArrayLike: Array | ndarray | ...).
autodoc_type_aliases = {
  "ArrayLike": "jax.typing.ArrayLike",
  **{
    name: name
    for name in (
      "optax.Updates",
      "optax.Params",
      "optax.OptState",
      "optax.ScalarOrSchedule",
      "optax.GradientTransformation",
      "optax.GradientTransformationExtraArgs",
      "jax.Array",
      "jax.typing.ArrayLike",
      "jax.sharding.Sharding",
    )
  },
}
# One parameter a line once a signature is longer than this.
python_maximum_signature_line_length = 88
autosummary_generate = False

napoleon_google_docstring = True
napoleon_numpy_docstring = False
# ``Attributes:`` of the NamedTuples become attribute entries (cross-reference
# targets such as `omerge_jax.MergeStats.kept_fraction`); the classes are
# documented without :members:, so no field is described twice.
napoleon_use_ivar = False
napoleon_use_param = True
napoleon_use_rtype = False

# --- MathJax, offline -----------------------------------------------------------
# Relative to _static: sphinx-mathjax-offline copies MathJax to _static/mathjax.
mathjax_path = "mathjax/tex-chtml.js"

# --- MyST: the guides, and the README as the front page ---------------------------
# `#section` anchors for headings down to ###, as GitHub makes them. A link to a
# missing page or anchor is a warning, so an error under -W.
myst_heading_anchors = 3
# Markdown files outside docs/ that are pages of the site, each through the page
# that includes it. A link to such a file (``../README.md#set-up-two-commands``
# from a guide, ``benchmarks/RESULTS.md`` from the README) is read as a link to
# that page and its anchor, and checked like any other; the files are unchanged.
MIRRORED = {
  ROOT / "README.md": DOCS / "index.md",
  ROOT / "benchmarks" / "RESULTS.md": DOCS / "benchmarks.md",
  ROOT / "CHANGELOG.md": DOCS / "changelog.md",
}

# --- HTML ---------------------------------------------------------------------------
html_theme = "sphinx_book_theme"
html_title = f"omerge_jax {release}"
html_theme_options = {
  "show_toc_level": 2,
  "navigation_with_keys": False,
  # pydata-sphinx-theme 0.20 puts a second search field in a top bar unless
  # this is set: the book theme has its search in the sidebar.
  "navbar_persistent": [],
}
html_show_sourcelink = False
html_static_path = ["_static"]
html_css_files = ["omerge.css"]

# `sphinx-build -b linkcheck`: the network is out of reach, so external URLs
# are not checked; internal links and anchors are checked by the HTML build.
linkcheck_ignore = [r"https?://.*"]


# --- Build hooks ----------------------------------------------------------------------
_MD_LINK = re.compile(r"(\]\()([^)\s#]+\.md)(#[^)\s]*)?(\))")


def _mirror_links(text: str, source: Path) -> str:
  """Point the Markdown links of ``source`` to a mirrored file at the page that includes it."""

  def replace(match):
    page = MIRRORED.get((source.parent / match.group(2)).resolve())
    if page is None:
      return match.group(0)
    new = os.path.relpath(page, source.parent).replace(os.sep, "/")
    return f"{match.group(1)}{new}{match.group(3) or ''}{match.group(4)}"

  return _MD_LINK.sub(replace, text)


def _on_source_read(app, docname, source):
  source[0] = _mirror_links(source[0], Path(app.env.doc2path(docname)))


def _on_include_read(app, relative_path, parent_docname, content):
  content[0] = _mirror_links(content[0], (Path(app.srcdir) / relative_path).resolve())


# Sphinx 9 writes a type alias inside a generic (``Sequence[optax.Params]``) as
# ``Sequence[TypeAliasForwardRef('optax.Params')]`` (sphinx-doc/sphinx#14003):
# put the alias's name back.
_FORWARD_REF = re.compile(r"TypeAliasForwardRef\('([^']+)'\)")


def _fix_alias_repr(app, what, name, obj, options, signature, return_annotation):
  fix = lambda text: text if text is None else _FORWARD_REF.sub(r"\1", text)
  return fix(signature), fix(return_annotation)


def _drop_type_docstring(app, what, name, obj, options, lines):
  """A constant without a ``#:`` comment gets its type's docstring (int's): drop it."""
  from sphinx.util.docstrings import prepare_docstring

  type_doc = type(obj).__doc__
  if (
    what == "data"
    and type_doc
    and [l for l in lines if l.strip()] == [l for l in prepare_docstring(type_doc) if l.strip()]
  ):
    lines.clear()


_REMOTE_ASSET = re.compile(
  r"<(?:script|link|img|iframe|source)\b[^>]*\b(?:src|href)=\"(?:https?:)?//[^\"]+\"[^>]*>", re.I
)


def _check_offline(app, exception):
  """Fail the build if a page loads anything from another host (a CDN)."""
  if exception is not None or app.builder.format != "html":
    return
  from sphinx.util import logging

  logger = logging.getLogger(__name__)
  out = Path(app.outdir)
  for page in sorted(out.rglob("*.html")):
    for tag in _REMOTE_ASSET.findall(page.read_text(encoding="utf-8")):
      logger.warning(
        "%s loads a remote asset (the site must work offline): %s", page.relative_to(out), tag
      )
  if not (out / "_static" / mathjax_path).is_file():
    logger.warning("MathJax is not vendored: _static/%s is missing", mathjax_path)


def setup(app):
  app.connect("autodoc-process-signature", _fix_alias_repr)
  # Before napoleon (priority 500) reformats the docstring.
  app.connect("autodoc-process-docstring", _drop_type_docstring, priority=400)
  app.connect("source-read", _on_source_read)
  app.connect("include-read", _on_include_read)
  # After sphinx-mathjax-offline's build-finished handler (priority 500) copied MathJax.
  app.connect("build-finished", _check_offline, priority=900)
