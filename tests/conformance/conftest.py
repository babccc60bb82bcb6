# `upstream/` runs inside a copy of Transformers' test tree (see test_conformance.py), never in this suite.
collect_ignore = ["upstream"]
