"""Models: the built-in nets (``build``), keras.applications backbones (``backbones``),
which layers train (``freeze``), ``model.init_from`` (``init_from``), pretrained weights
(``weights``, and ``hpcjobs weights fetch`` in ``command``)."""
