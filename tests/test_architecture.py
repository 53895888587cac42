"""Imports flow one way: an AST walk over the package fails on any import that runs back up.

The layers, lowest first (a module may import its own layer and any layer below it):

  0  pallas_kernels                     kernels: jax only, nothing of taipan_jax
  1  taipan_jax.config, .configs,       data: configs, their reference doc, input pipelines,
     .config_reference, .data, .version the version
  2  taipan_jax.ops                     one file per op: XLA path + dispatch to the kernels
  3  taipan_jax.sharding                meshes, logical-axis rules, sharding constraints
  4  taipan_jax.models                  flax.nnx modules and build_model
  5  taipan_jax.training, .inference,   what is done with a model
     .interop
  6  taipan_jax (the package's         the import surface and the command line
     __init__), .cli, .train

Lazy imports (inside functions) count like top-level ones: a cycle dodged by a late import is
still a cycle. `python tests/test_architecture.py` prints every upward edge.
"""
from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent

LAYERS = (
    ("pallas_kernels",),
    ("taipan_jax.config", "taipan_jax.configs", "taipan_jax.config_reference", "taipan_jax.data",
     "taipan_jax.version"),
    ("taipan_jax.ops",),
    ("taipan_jax.sharding",),
    ("taipan_jax.models",),
    ("taipan_jax.training", "taipan_jax.inference", "taipan_jax.interop"),
    ("taipan_jax", "taipan_jax.cli", "taipan_jax.cli_usage", "taipan_jax.train"),
)


def layer_of(module: str) -> int:
  """The layer of a dotted module name: its longest listed prefix."""
  best, rank = -1, None
  for i, prefixes in enumerate(LAYERS):
    for p in prefixes:
      if (module == p or module.startswith(p + ".")) and len(p) > best:
        best, rank = len(p), i
  if rank is None:
    raise AssertionError(f"{module} is in no layer: add it to LAYERS in {__file__}")
  return rank


def _module_files():
  """(dotted name, path, is_package) of every module of both packages."""
  sources = [(ROOT / "taipan_jax", "taipan_jax"), (ROOT / "pallas_kernels", "pallas_kernels"),
             (ROOT / "configs", "taipan_jax.configs")]
  for base, name in sources:
    for path in sorted(base.rglob("*.py")):
      parts = [name] + list(path.relative_to(base).with_suffix("").parts)
      is_package = parts[-1] == "__init__"
      if is_package:
        parts = parts[:-1]
      yield ".".join(parts), path, is_package


def _is_module(dotted: str) -> bool:
  parts = dotted.split(".")
  if parts[:2] == ["taipan_jax", "configs"]:
    base = ROOT.joinpath("configs", *parts[2:])
  else:
    base = ROOT.joinpath(*parts)
  return base.with_suffix(".py").exists() or (base / "__init__.py").exists()


def _targets(node, module: str, is_package: bool):
  """Dotted names of the internal modules an import statement reaches."""
  if isinstance(node, ast.Import):
    return [a.name for a in node.names]
  if node.level:  # relative: resolve against this module's package
    package = module.split(".") if is_package else module.split(".")[:-1]
    package = package[:len(package) - node.level + 1]
    base = ".".join(package + ([node.module] if node.module else []))
  else:
    base = node.module
  # `from pkg import sub` reaches pkg.sub when sub is a module, pkg otherwise.
  return [f"{base}.{a.name}" if _is_module(f"{base}.{a.name}") else base for a in node.names]


def import_edges():
  """(importer, imported, file, line) for every internal import, top-level or lazy."""
  for module, path, is_package in _module_files():
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      if not isinstance(node, (ast.Import, ast.ImportFrom)):
        continue
      for target in _targets(node, module, is_package):
        if target.split(".")[0] in ("taipan_jax", "pallas_kernels"):
          yield module, target, path.relative_to(ROOT), node.lineno


def upward_imports():
  """Every import of a higher layer by a lower one, as 'file:line importer -> imported'."""
  return sorted({f"{path}:{line} {src} -> {dst}" for src, dst, path, line in import_edges()
                if layer_of(dst) > layer_of(src)})


def test_no_upward_imports():
  upward = upward_imports()
  assert not upward, "imports that run back up the layers:\n  " + "\n  ".join(upward)


def test_every_module_has_a_layer():
  for module, _, _ in _module_files():
    layer_of(module)


def test_the_walk_sees_imports():
  # The check above is only as good as the walk: it must find the edges we know exist.
  edges = {(src, dst) for src, dst, _, _ in import_edges()}
  assert ("taipan_jax.models.lm", "taipan_jax.ops") in edges
  assert ("taipan_jax.ops.ssd", "pallas_kernels.ssd") in edges
  assert layer_of("taipan_jax.models.lm") > layer_of("taipan_jax.ops.ssd")


def test_kernels_know_nothing_of_taipan_jax():
  leaks = [f"{p}:{n} {d}" for s, d, p, n in import_edges()
           if s.startswith("pallas_kernels") and d.startswith("taipan_jax")]
  assert not leaks, leaks


if __name__ == "__main__":
  print("\n".join(upward_imports()) or "no upward imports")
