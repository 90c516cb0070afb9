"""Every exception qckpt raises; each subclasses the built-in a caller would expect."""


class QckptError(Exception):
    """Base of all qckpt errors; the CLI prints these as one `error:` line."""


class QuantizationInputError(QckptError, ValueError):
    """A tensor handed to the quantizer is unusable (NaN/inf, empty, bad dtype, bad blocksize)."""


class NativeError(QckptError, RuntimeError):
    """The native library returned a failure status."""


class NativeUnavailableError(QckptError, ImportError):
    """The native extension could not be loaded (not built, or built for another platform)."""


class StateDictError(QckptError, ValueError):
    """A serialized quantized tensor is missing keys, has wrong dtypes/shapes or a bad quant state."""


class CheckpointError(QckptError, ValueError):
    """A checkpoint file or folder is malformed (bad header, offsets, index, config)."""


class SourceNotFoundError(QckptError, FileNotFoundError):
    """A local path, Hub repo, revision or file does not exist."""


class HubError(QckptError, OSError):
    """The Hub answered with an error after retries (auth, HTTP status, integrity)."""


class OutputExistsError(QckptError, FileExistsError):
    """The output folder exists and is not empty, and neither --overwrite nor --resume was given."""


class DiskFullError(QckptError, OSError):
    """Writing the output failed for lack of space."""


class ModelLoadError(QckptError, ValueError):
    """A quantized checkpoint does not match the model the config describes."""


class OptimizerError(QckptError, ValueError):
    """An 8-bit optimizer setting, parameter or loaded optimizer state is unusable (converter.optim)."""


class VerificationError(QckptError, ValueError):
    """A converted folder failed `verify` (raised where a clean folder is required, e.g. before a push)."""
