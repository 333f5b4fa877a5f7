"""vlcap's core, in layers: ``model`` (the captioner, its files and hook points), ``infer``
(decoding and captioning) beside ``eval`` (scoring), ``train`` on top; the modules directly in
this package are the base every layer may use (config, data, plugins, runtime, progress,
outputs, atomic writes, errors, hook specifications). Lower layers never import higher ones
(setup.cfg's import-linter contracts; docs/design.md). Plugins use ``vlcap.api``, not this."""
