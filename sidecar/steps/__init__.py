"""Policy steps, one module each. A step is `async (call, next) -> reply`.

Every module has `build(service, *, state) -> Step | None`: it validates and
precomputes at load time, and returns None when the policy does not ask for it.
"""

from ..call import Handler, Step

__all__ = ["Handler", "Step"]
