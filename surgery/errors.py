"""Every error model-surgery raises, in one place.

Each message states the rule, the offending value and the fix. Each class also derives from the
builtin that fits (ValueError, TypeError, ...), so ``except ValueError`` keeps working for callers
who do not know our names.
"""

SHOWN = 120  # characters of a user's path or pattern that a message repeats


def clip(text: str) -> str:
    """``text`` cut to ``SHOWN`` characters: a path of ten million characters in a file is not echoed whole."""
    return text if len(text) <= SHOWN else f"{text[:SHOWN]}... ({len(text):,} characters)"


class SurgeryError(Exception):
    """Base class of model-surgery's errors."""


class PatternError(SurgeryError, ValueError):
    """A `where` pattern is malformed (bad regex, unbalanced braces or brackets)."""


class NoMatchError(SurgeryError, ValueError):
    """A `where` pattern matches no module of the model."""


class UnsupportedModuleError(SurgeryError, TypeError):
    """A `where` pattern matches only modules that no variant can adapt (a LayerNorm, say)."""


class WhereTypeError(SurgeryError, TypeError):
    """`where` or `variant` is of the wrong type."""


class ConfigError(SurgeryError, ValueError):
    """A variant's hyper-parameters are invalid, or invalid at a particular site."""


class AlreadyRewrittenError(SurgeryError, ValueError):
    """A site is already rewritten; stacking two variants on one site is not supported."""


class DenseWeightError(SurgeryError, TypeError):
    """A variant needs a dense base weight and the matched layer has none."""


class TiedWeightError(SurgeryError, ValueError):
    """The operation would silently change a weight shared with another module."""


class NonFiniteError(SurgeryError, ValueError):
    """NaN or Inf in adapter tensors or in a folded weight."""


class IdentityError(SurgeryError, RuntimeError):
    """A variant that promises identity at init did not deliver it (a bug in the variant)."""


class CalibrationError(SurgeryError, ValueError):
    """A data-driven variant (EVA) got no calibration data, or too little."""


class AdapterFileError(SurgeryError, OSError):
    """An adapter file is missing, truncated, not safetensors, or lacks our metadata."""


class BaseMismatchError(SurgeryError, ValueError):
    """An adapter file was made for another base model (other paths or shapes)."""


class UnknownVariantError(SurgeryError, ValueError):
    """An adapter file names a variant this version does not know."""


class NotRewrittenError(SurgeryError, ValueError):
    """The model has no sites, so there is no adapter to merge, restore, save, export, switch off or scale."""


class ShardedModelError(SurgeryError, RuntimeError):
    """A verb that needs whole weights was called on a model sharded by FSDP2 (``fully_shard``)."""


class AdaptersDisabledError(SurgeryError, RuntimeError):
    """A verb was called on a model inside ``with surgery.disabled(model):``."""


class VariantSpecError(SurgeryError, ValueError):
    """A variant written as text (the CLI's ``--variant "LoRA(r=8)"``) cannot be parsed."""


class RenderError(SurgeryError, RuntimeError):
    """Drawing a diff needs a tool that is missing (Graphviz's ``dot``, pydot)."""


class DiffInputError(SurgeryError, TypeError):
    """surgery.diff got something other than two models or two GraphModules."""


class ModelDirError(SurgeryError, OSError):
    """A path given as a saved model directory holds no model (no config.json)."""


class OutputPathError(SurgeryError, OSError):
    """An output path cannot be written as asked: a directory where a file goes (or the reverse), a
    missing or unwritable folder, a name too long, the input itself."""


class OutputFormatError(SurgeryError, ValueError):
    """An output file's extension names no format the command can write."""


class PeftFormatError(SurgeryError, ValueError):
    """An adapter that PEFT's format cannot express, or a PEFT adapter using a feature import_peft lacks."""


class MetaDeviceError(SurgeryError, RuntimeError):
    """Tensors are on the meta device (shapes only), so there are no values to fold or save."""


class VariantContractError(SurgeryError, RuntimeError):
    """A variant broke its contract: its forward cannot be traced, its init or fold failed or returned the
    wrong shape or dropped a bias. A bug in the variant; the message names the variant and the rule."""


class TraceError(SurgeryError, RuntimeError):
    """A model could not be captured as one whole-model graph (neither torch.fx nor torch.export)."""


class GraphScopeError(SurgeryError, ValueError):
    """An operation on a traced GraphModule that graph scope cannot do (a module called twice, say)."""


class RegistrationError(SurgeryError, TypeError):
    """@register got something other than a Variant class, or a name that is already taken."""
