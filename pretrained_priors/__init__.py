"""Fitted meta-encoder priors shipped with diffaug (installed as the package ``diffaug.pretrained_priors``).

Each architecture has a folder (``default/``, ``paper/``) with weight files and a ``manifest.json``; regenerate
them with ``diffaug fit-priors --out pretrained_priors/<arch> --overwrite-shipped``.
"""
