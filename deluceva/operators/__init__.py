"""Delta variants of ONNX operators, one module per operator family, registered by op type."""

from deluceva.operators._common import (
    Delta,
    DeltaOperator,
    Grid,
    OpSpec,
    UnsupportedOperator,
    delta_support,
    get_operator,
    register,
    registered_op_types,
)

# Importing a module registers its operators.
from deluceva.operators import binary, concat, conv, layout, pool, resize, softmax, unary  # noqa: F401,E402

__all__ = [
    "Delta",
    "DeltaOperator",
    "Grid",
    "OpSpec",
    "UnsupportedOperator",
    "delta_support",
    "get_operator",
    "register",
    "registered_op_types",
]
