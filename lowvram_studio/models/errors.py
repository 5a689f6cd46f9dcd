"""The one error every model loader raises for a model the user can fix or replace."""


class ModelError(ValueError):
    """A model that cannot be used, phrased as 'what is wrong; what to do'."""
