"""`psynth_jax.pytree.dataclass`: tree structures that tell classes apart.

* Two classes with the same fields (unrelated, or a subclass) have unequal structures;
  so do all merge operators, whose classes share the `mapper` field.
* Static fields are part of the structure, the others are leaves with attribute keys;
  flatten / unflatten and `replace` round-trip.
* No module of the package registers a pytree through `register_dataclass` (directly or
  through `flax.struct.dataclass`), whose structures compare equal across classes.
"""

import dataclasses
import itertools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import psynth_jax
from psynth_jax import operators, pytree
from psynth_jax.testing import tiny_config


@pytree.dataclass
class Point:
  x: jax.Array
  label: str = pytree.field(static=True, default="a")


@pytree.dataclass
class Other:
  x: jax.Array
  label: str = pytree.field(static=True, default="a")


@pytree.dataclass
class Child(Point):
  pass


def test_classes_with_the_same_fields_have_unequal_structures():
  s = jax.tree.structure
  p, o, c = Point(jnp.ones(2)), Other(jnp.ones(2)), Child(jnp.ones(2))
  assert s(p) != s(o) and s(p) != s(c) and s(o) != s(c)
  assert s(p) == s(Point(jnp.zeros(2)))
  assert s(p) != s(Point(jnp.zeros(2), label="b"))  # a static field is structure


def test_every_merge_operator_has_its_own_structure():
  config = tiny_config()
  ops = [operators.create(name, config) for name in operators.names()]
  for a, b in itertools.combinations(ops, 2):
    assert jax.tree.structure(a) != jax.tree.structure(b), (a.name, b.name)


def test_jit_runs_each_class_own_program():
  calls = []

  @jax.jit
  def f(point):
    calls.append(type(point).__name__)
    return point.x + (1.0 if isinstance(point, Child) else 0.0)

  x = jnp.arange(3.0)
  np.testing.assert_array_equal(f(Point(x)), x)
  np.testing.assert_array_equal(f(Child(x)), x + 1.0)
  assert calls == ["Point", "Child"]


def test_leaves_keys_round_trip_and_replace():
  p = Child(jnp.arange(2.0), label="z")
  paths, tree = jax.tree_util.tree_flatten_with_path(p)
  assert [jax.tree_util.keystr(k) for k, _ in paths] == [".x"]
  back = jax.tree.unflatten(tree, [v for _, v in paths])
  assert isinstance(back, Child) and back.label == "z"
  np.testing.assert_array_equal(back.x, p.x)
  q = p.replace(label="y")
  assert q.label == "y" and p.label == "z"
  with pytest.raises(dataclasses.FrozenInstanceError):
    p.x = 1


def test_a_field_not_set_by_init_is_refused():
  with pytest.raises(TypeError, match="__init__"):

    @pytree.dataclass
    class Bad:
      x: int = dataclasses.field(init=False, default=0)


def test_the_package_registers_no_dataclass_pytree_of_its_own():
  root = pathlib.Path(psynth_jax.__file__).parent
  offenders = []
  for path in root.rglob("*.py"):
    text = path.read_text()
    if path.name != "pytree.py" and ("struct.dataclass" in text or "register_dataclass" in text):
      offenders.append(str(path.relative_to(root)))
  assert offenders == []
