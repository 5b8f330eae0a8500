"""The one exception family of mechkit: every error says what was wrong and what to do."""


class MechkitError(ValueError):
    """Bad input or an impossible request; the message names the fix."""


class ModelNotFoundError(MechkitError, LookupError):
    """A model name or path that resolves to nothing loadable."""


class MemoryBudgetError(MechkitError):
    """A request that cannot fit the memory bound it was given."""
