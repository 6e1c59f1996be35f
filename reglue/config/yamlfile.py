"""Reading configuration YAML: PyYAML's safe loader with YAML 1.2's numbers, so ``lr: 1e-3`` is a float.

PyYAML follows YAML 1.1, where a float needs a dot (``1.0e-3``) and ``1e-3`` is the string "1e-3"; researchers
write ``1e-3`` in presets and ``--set optim.lr=1e-3``, and a string there would be refused as a wrong type.
"""

from __future__ import annotations

import re

import yaml

# YAML 1.2 core schema floats that YAML 1.1 reads as strings: a mantissa without a dot and an exponent (1e-3, 2E5)
_EXPONENT_FLOAT = re.compile(r"^[-+]?[0-9]+[eE][-+]?[0-9]+$")


class ConfigLoader(yaml.SafeLoader):
    """yaml.SafeLoader that also resolves YAML 1.2 exponent floats such as ``1e-3``."""


ConfigLoader.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+0123456789"))


def load_yaml(text: str):
    """The plain data of YAML ``text`` (mappings, lists, scalars), with ``1e-3`` read as a float."""
    return yaml.load(text, Loader=ConfigLoader)  # noqa: S506 - a SafeLoader subclass: no arbitrary objects
