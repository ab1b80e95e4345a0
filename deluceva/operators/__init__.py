"""Delta variants of ONNX operators, one module per operator family, registered by op type."""

from deluceva.operators._common import (
    DeltaOperator,
    DeltaTensor,
    Layout,
    OpSpec,
    UnsupportedOperator,
    delta_support,
    get_operator,
    register,
    registered_op_types,
)

# Importing a module registers its operators.
from deluceva.operators import concat, conv, elementwise, pool, rearrange  # noqa: F401,E402

__all__ = [
    "DeltaOperator",
    "DeltaTensor",
    "Layout",
    "OpSpec",
    "UnsupportedOperator",
    "delta_support",
    "get_operator",
    "register",
    "registered_op_types",
]
