"""``sgl_kernel.scalar_type`` of the CUDA stand-in: names only (quantized-weight kernels that
would use them are not implemented)."""


class ScalarType:
    """A named scalar type (``scalar_types.uint4b8`` and the like); carries its name only."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"ScalarType({self.name})"


class _ScalarTypes:
    def __getattr__(self, name: str) -> ScalarType:
        if name.startswith("__"):
            raise AttributeError(name)
        return ScalarType(name)


scalar_types = _ScalarTypes()
