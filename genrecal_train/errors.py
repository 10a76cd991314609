"""The one error type the trainer raises for a run that cannot start or go on."""


class TrainError(ValueError):
    """A run that cannot start or go on (no usable sample, a non-finite loss, a resume that does not fit
    its checkpoint); the message names the cause and the fix. `genrecal-train` prints it as one line."""
