"""vlcap: parameter-efficient fine-tuning of vision-language captioners.

Every PEFT method, decoding strategy and metric is a plugin (see ``vlcap.core.hookspecs``);
plugin authors import what they need from ``vlcap.api`` and mark hooks with ``vlcap.hookimpl``.
"""
from vlcap.core.hookspecs import hookimpl

# The release. Kept here, not read from installed metadata, so a source checkout that was never
# pip-installed (PYTHONPATH=. python -m vlcap) records the same version in its checkpoints.
__version__ = "0.1.0"

__all__ = ["hookimpl", "__version__"]
