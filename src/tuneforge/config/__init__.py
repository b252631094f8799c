"""Run configuration: schema, YAML loading, dotted overrides. Pure Python (no torch).

Names are re-exported lazily: the schema imports every method module (it builds the ``method:`` union from
their registrations), and a method module imports :mod:`tuneforge.config.strict`, so importing this package must
not import the schema.
"""

from tuneforge.utils import lazy_exports

_EXPORTS = {
    **{name: "tuneforge.config.load" for name in
       ("apply_overrides", "dump_config", "load_config", "read_yaml", "validate_config")},
    **{name: "tuneforge.config.schema" for name in
       ("METHOD_NAMES", "DataConfig", "MethodConfig", "ModelConfig", "RunConfig", "TrainConfig")},
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
