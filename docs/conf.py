"""Sphinx configuration of mpjax's documentation.

Build (from the repository root, after ``pip install -e '.[docs]'``):

    sphinx-build -W -b html docs docs/_build/html

Why Sphinx: optax and flax document themselves with Sphinx + autodoc +
napoleon, so mpjax's Google-style docstrings (``Args:``, ``Returns:``,
``Examples:``) render the way JAX users know, and ``-W`` turns a broken
reference or a docstring autodoc cannot import into a failed build. Why
MyST-parser: the pages are Markdown, like README.md, so text moves between
README and the docs without conversion and ``tests/test_readme.py`` runs the
Python blocks of both the same way. Nothing is fetched from the network (no
intersphinx) and no notebook is executed: the build takes seconds.
"""

import os
import re
import sys

# The checkout's mpjax, not whatever else is installed.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import mpjax  # pylint: disable=g-import-not-at-top,wrong-import-position

project = "mpjax"
author = "the mpjax authors"
copyright = "the mpjax authors"  # pylint: disable=redefined-builtin
release = mpjax.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "myst_parser",
]
source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build"]

# Google-style docstrings only (the house style); NumPy style is not used.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
# Attributes: sections as fields of the class, not a second description of
# each NamedTuple field next to the one autodoc makes.
napoleon_use_ivar = True
# `name` in a docstring links to the Python object when one exists.
default_role = "py:obj"

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "show-inheritance": False}
# Signatures read `mpjax.X`, not `mpjax._src.module.X`.
add_module_names = True
python_use_unqualified_type_names = True

myst_enable_extensions = ["colon_fence"]
myst_heading_anchors = 3

html_theme = "alabaster"
html_title = f"mpjax {release}"
html_static_path = []


def _check_api_reference(app):
  """Warns (an error under -W) for a name of `mpjax.__all__` not in api.md."""
  from sphinx.util import logging  # pylint: disable=g-import-not-at-top
  with open(os.path.join(app.srcdir, "api.md"), encoding="utf-8") as f:
    documented = set(re.findall(
        r"^\.\. (?:auto\w+|py:data)::\s+mpjax\.(\w+)", f.read(), flags=re.M))
  logger = logging.getLogger(__name__)
  for name in sorted(set(mpjax.__all__) - documented):
    logger.warning("mpjax.%s is public (mpjax.__all__) but not in "
                   "docs/api.md", name, location="api")
  for name in sorted(documented - set(mpjax.__all__)):
    logger.warning("docs/api.md documents mpjax.%s, which is not in "
                   "mpjax.__all__", name, location="api")


# Outside ``literals``: |x| (an absolute value, not a substitution) and
# `Name`s (a plural: reST wants a space after the closing backquote).
_LITERAL = re.compile(r"(``.+?``)")
_ABS = re.compile(r"(?<!\\)\|([A-Za-z_][\w.]*)\|")
_PLURAL = re.compile(r"(?<![`\w])(`[^`\s][^`]*`)(?=[A-Za-z])")


def _house_docstrings(app, what, name, obj, options, lines):
  """The house docstrings' conventions, in the reST that autodoc reads."""
  del app, what, name, obj, options
  for i, line in enumerate(lines):
    parts = _LITERAL.split(line)
    for j in range(0, len(parts), 2):  # the even parts are outside literals
      parts[j] = _PLURAL.sub(r"\1\\ ", _ABS.sub(r"\\|\1\\|", parts[j]))
    lines[i] = "".join(parts)


def _skip_namedtuple_aliases(app, what, name, obj, skip, options):
  """NamedTuple fields are described by the class's Attributes: section."""
  del app, what, name, options
  doc = getattr(obj, "__doc__", None) or ""
  return True if doc.startswith("Alias for field number") else skip


# Markdown links and images, ``[text](target)`` / ``![alt](target)``.
_LINK = re.compile(r"(!?)\[([^\]]*)\]\(([^)\s]+)\)")


def _repository_links(text, source_dir, doc_dir, srcdir):
  """Links to repository files outside docs/ become file (download) links.

  The pages link to benchmarks' JSON, Markdown and plots the way GitHub
  shows them, by relative path; Sphinx knows only the pages under docs/ and
  would call a link to ``../benchmarks/README.md`` a missing document. A
  target that exists is rewritten relative to the page that shows it (for a
  page or an included file), as ``path:`` (MyST's file link) unless it is an
  image or a page of the site, and a directory is named in code; a target
  that does not exist is left alone, so it still fails the build.
  """
  def rewrite(match):
    bang, label, target = match.groups()
    path, _, anchor = target.partition("#")
    if not path or re.match(r"^[a-z][a-z0-9+.-]*:", path):
      return match.group(0)  # an anchor, a URL, or already a path: link
    resolved = os.path.normpath(os.path.join(source_dir, path))
    if not os.path.exists(resolved):
      return match.group(0)
    relative = os.path.relpath(resolved, doc_dir)
    if os.path.isdir(resolved):  # Sphinx cannot serve a directory: name it
      repository = os.path.dirname(srcdir)
      return f"{label} (`{os.path.relpath(resolved, repository)}/`)"
    inside = not os.path.relpath(resolved, srcdir).startswith("..")
    if bang or (inside and resolved.endswith(".md")):
      new = relative + ("#" + anchor if anchor else "")
    else:
      new = "path:" + relative
    return f"{bang}[{label}]({new})"
  return _LINK.sub(rewrite, text)


def _page_links(app, docname, source):
  doc_dir = os.path.dirname(app.env.doc2path(docname))
  source[0] = _repository_links(source[0], doc_dir, doc_dir, app.srcdir)


def _included_links(app, relative_path, parent_docname, content):
  doc_dir = os.path.dirname(app.env.doc2path(parent_docname))
  source_dir = os.path.dirname(os.path.join(app.srcdir, relative_path))
  content[0] = _repository_links(content[0], source_dir, doc_dir, app.srcdir)


def setup(app):
  app.connect("source-read", _page_links)
  app.connect("include-read", _included_links)
  app.connect("builder-inited", _check_api_reference)
  app.connect("autodoc-process-docstring", _house_docstrings)
  app.connect("autodoc-skip-member", _skip_namedtuple_aliases)
