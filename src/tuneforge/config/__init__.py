"""Run configuration: schema, YAML loading, dotted overrides. Pure Python (no torch).

Names are re-exported lazily (importing this package does not build the schema). The package is the bottom layer:
it imports no other tuneforge package; plug-ins whose options are part of a run config declare them here
(:mod:`tuneforge.config.methods`, :mod:`tuneforge.config.stages`).
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
