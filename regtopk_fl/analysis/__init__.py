"""Post-processing of run outputs: collect sweeps into tables, plot them.

``regtopk_fl.analysis.collect`` (``collect``: one row per job, ``load_curves``:
one row per job and round) and ``regtopk_fl.analysis.plot`` (``plot``: the
figures a sweep supports); ``regtopk-collect`` and ``regtopk-plot`` are their
command-line front ends. Nothing is re-exported here, so the submodule names
are never shadowed by the functions of the same name.
"""
